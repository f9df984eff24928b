//! The standard normal distribution, which three parts of the simulator need:
//! today's judge (its critical z), the traffic (log-normal latencies drawn
//! by inverse transform) and the Kayenta-style check (the Mann-Whitney
//! test's normal approximation). The quantile is the judge's own, so
//! all of them agree with it.

/// The standard normal quantile, for `p` in (0, 1): the judge's own.
pub use serin_control::judge::inverse_normal_cdf as quantile;

/// P(Z > z) for a standard normal Z: `erfc(z / √2) / 2`, with the
/// Chebyshev fit of `erfc` from Numerical Recipes (fractional error below
/// 1.2e-7 everywhere).
pub fn upper_tail(z: f64) -> f64 {
    let x = z / std::f64::consts::SQRT_2;
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.5 * a);
    let poly = -a * a - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98
                                + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        erfc / 2.0
    } else {
        1.0 - erfc / 2.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantile_and_tail_agree_with_the_tables() {
        assert!((quantile(0.999) - 3.090_232).abs() < 1e-5);
        assert!((quantile(0.95) - 1.644_854).abs() < 1e-5);
        assert!((quantile(0.001) + 3.090_232).abs() < 1e-5);
        assert!((upper_tail(1.959_964) - 0.025).abs() < 1e-6);
        assert!((upper_tail(2.326_348) - 0.01).abs() < 1e-6);
        assert!((upper_tail(-1.644_854) - 0.95).abs() < 1e-6);
        assert!((upper_tail(0.0) - 0.5).abs() < 1e-7);
        for p in [1e-6, 0.01, 0.3, 0.5, 0.9, 0.999] {
            assert!(
                (upper_tail(-quantile(p)) - p).abs() < 1e-7 * p.max(1e-3),
                "{p}"
            );
        }
    }
}
