//! The fleet benchmark's part of `bench/REPORT.md` (`serin-bench fleet`,
//! bench/src/fleet.rs): its rows of the targets table and its section under
//! the safety benchmarks. Kept apart from the peer report, which it shares
//! nothing with but the file.

use std::fmt::Write as _;

use super::verdict;
use crate::fleet::{median_max, ApiWindow, FleetBench, FleetSize, Propagation, VERBS};
use crate::results::Results;

/// The propagation target: first member's local revert → last member at 0.
const PROPAGATION_TARGET_MS: f64 = 1_000.0;
/// "At most about 1" write per member per 10 s, judged with 10% for "about".
const WRITES_TARGET: f64 = 1.0;
const WRITES_JUDGED: f64 = 1.1;

fn med_max(p: &Propagation, f: impl Fn(&crate::fleet::Trial) -> Option<f64>) -> String {
    match median_max(p.trials.iter().map(f)) {
        Some((m, hi, k)) if k == p.trials.len() => format!("{m:.1} / {hi:.1}"),
        Some((m, hi, k)) => format!("{m:.1} / {hi:.1} ({k} of {})", p.trials.len()),
        None => "–".into(),
    }
}

/// The fleet's rows of the targets table.
pub(super) fn target_rows(s: &mut String, res: &Results) {
    let Some(fleet) = &res.fleet else {
        return;
    };
    for size in fleet.sizes.iter().filter(|z| z.members >= 20) {
        for p in &size.propagation {
            let all = p.trials.iter().all(|t| t.local_to_last_ms.is_some());
            if let Some((m, hi, _)) = median_max(p.trials.iter().map(|t| t.local_to_last_ms)) {
                let _ = writeln!(
                    s,
                    "| fleet: first member's local revert → last of {} members at weight 0 (fake API, +{:.0} ms per response; median / max of {}) | ≤ 1 s | {m:.0} / {hi:.0} ms{} | {} |",
                    size.members,
                    p.api_latency_ms,
                    p.trials.len(),
                    if all { "" } else { ", some trials never reached every member" },
                    verdict(all && hi <= PROPAGATION_TARGET_MS)
                );
            }
        }
    }
    for size in &fleet.sizes {
        let w = size.steady.writes_per_member_per_10s(size.members);
        let _ = writeln!(
            s,
            "| fleet: API writes at steady state, {} members, per member per 10 s | ≤ about {WRITES_TARGET:.0} (judged ≤ {WRITES_JUDGED}) | {w:.2} | {} |",
            size.members,
            verdict(size.steady.seconds > 0.0 && w <= WRITES_JUDGED)
        );
    }
}

fn by_resource(w: &ApiWindow) -> String {
    let parts: Vec<String> = w
        .requests
        .iter()
        .map(|(v, r, n)| format!("{v} {r} {:.0}", w.per_minute(*n)))
        .collect();
    parts.join(", ")
}

fn requests_row(s: &mut String, label: &str, size: &FleetSize, w: &ApiWindow) {
    let _ = write!(s, "| {} | {label} | {:.0} s |", size.members, w.seconds);
    for verb in VERBS {
        let _ = write!(s, " {:.0} |", w.per_minute(w.verb(verb)));
    }
    let events = w.per_minute(w.object_events);
    let _ = writeln!(
        s,
        " {:.0} | {:.0} | {:.2} | {events:.0} | {:.1} KB | {:.0} MB | {} |",
        w.per_minute(w.total()),
        w.per_minute(w.writes()),
        w.writes_per_member_per_10s(size.members),
        w.object_bytes as f64 / 1000.0,
        events * w.object_bytes as f64 * size.members as f64 / 1e6,
        by_resource(w)
    );
}

/// The section under "Safety benchmarks".
pub(super) fn section(s: &mut String, res: &Results) {
    let _ = writeln!(
        s,
        "\n### Fleet mode: revert propagation and Kubernetes API requests\n"
    );
    let Some(fleet) = &res.fleet else {
        let _ = writeln!(s, "Not measured in this report (`serin-bench fleet`).");
        return;
    };
    write_section(s, fleet);
}

fn write_section(s: &mut String, f: &FleetBench) {
    let sizes: Vec<String> = f.sizes.iter().map(|z| z.members.to_string()).collect();
    let _ = writeln!(
        s,
        "`serin-bench fleet{}` on {} (serin commit `{}`), {:.0} s{}{}. bench/src/fleet.rs: {} real `serin run --fleet` \
         processes (the release binary, one worker each, default `--fleet-report-interval` 10 s and \
         `--fleet-lease-duration` 15 s) against `serin_tests::kube_api::FakeKube`, an in-process fake Kubernetes API \
         server that speaks the real wire protocol, on 127.0.0.1; one shared stable and one shared canary upstream. \
         Everything shares the machine's {} cores.\n",
        if f.quick { " --quick" } else { "" },
        f.started,
        f.commit,
        f.wall_seconds,
        if f.waited_seconds >= 1.0 {
            format!(" (of which {:.0} s waiting for other builds to finish)", f.waited_seconds)
        } else {
            String::new()
        },
        if f.quick {
            ". **Quick mode: 3 trials and a 20 s idle window; use the full run for numbers you quote**"
        } else {
            ""
        },
        sizes.join(" and "),
        std::thread::available_parallelism().map_or(2, |n| n.get()),
    );
    let _ = writeln!(s, "#### Revert propagation\n");
    let _ = writeln!(
        s,
        "Each trial re-arms a rolled-back fleet at 50% with `PUT /weight` on the last member's control API (a new epoch) \
         and waits for every member's `/status` to show 50%. 100 healthy requests go through `m0`, then at the onset \
         the canary starts answering 500 and `m0` alone gets {:.0} req/s (paced, 4 keep-alive connections) until it \
         reverts. Every member's `GET /status` is polled every {:.0} ms on its own keep-alive connection, and the fake's \
         object is read in process every 1 ms; all instants come from the bench's one monotonic clock. `m0` at 0 is its \
         own judge's revert; the rollback then reaches the API when `m0` writes it (a GET and a merge patch of the \
         status, preconditioned on its resourceVersion), and every other member follows its watch. Times are in ms, \
         median / max over the trials; each is late by up to one poll interval plus a `/status` round trip, which is \
         why the API can look a little earlier than `m0` itself. A member's `/status` answers after the member has \
         saved its new state (two fsyncs; the rollout's lock is held across the save), so these times include that \
         save, which the route table does not wait for. The re-arm column includes each member's immediate report \
         when it applies a new epoch (a ConfigMap apply each, read only by the leader).\n",
        f.failing_rps, f.poll_ms
    );
    let _ = writeln!(
        s,
        "| members | API latency added | trials | onset → `m0` at 0 | `m0` at 0 → rollback in the API | `m0` at 0 → last member at 0 | onset → last member at 0 | re-arm: `PUT /weight` → every member at 50% | rolled back by |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for size in &f.sizes {
        for p in &size.propagation {
            let mut actors: Vec<String> = p.trials.iter().map(|t| t.actor.clone()).collect();
            actors.sort();
            actors.dedup();
            let _ = writeln!(
                s,
                "| {} | {:.0} ms | {} | {} | {} | {} | {} | {} | {} |",
                size.members,
                p.api_latency_ms,
                p.trials.len(),
                med_max(p, |t| t.onset_to_local_ms),
                med_max(p, |t| t.local_to_api_ms),
                med_max(p, |t| t.local_to_last_ms),
                med_max(p, crate::fleet::Trial::onset_to_last_ms),
                med_max(p, |t| t.rearm_ms),
                actors
                    .iter()
                    .map(|a| format!("`{a}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let _ = writeln!(
        s,
        "\nThe fake adds nothing by default: the 0 ms rows are serin's own cost (the judge's 10 ms look, the write, the \
         watch event, applying it) on a loopback API. The 20 ms rows delay every API response by 20 ms \
         (`FakeKube::set_latency`), as a remote API server would; events on an already open watch are not delayed, so \
         they add `m0`'s two round trips (read and write: about 40 ms) and show that nothing else waits on the API. \
         On a real cluster the write also goes through etcd and the watch cache before every member hears it: that \
         fan-out is typically tens of milliseconds, to add to the 20 ms rows.\n"
    );

    let _ = writeln!(s, "#### Kubernetes API requests\n");
    let _ = writeln!(
        s,
        "`FakeKube::requests()` snapshots, by verb, scaled to requests per minute. **Steady state:** the fleet at a \
         manual 50%, no traffic, no rollout, counted after {} s of settling (longer than one report interval with its \
         jitter, so every member's first report is behind it) over the window shown (windows under 60 s are scaled \
         to a minute). **Rollout:** `serin rollout --steps {} --hold {} --fleet` from the CLI (its own requests \
         included) with {:.0} req/s of healthy traffic through each member, counted from the CLI's start to \
         `promoted`. Writes are create, update, patch, apply and delete. Object changes are the `SerinRollout`'s \
         watch events per minute (each goes to every member with the whole object); the object's JSON size is taken \
         at the end of the window, and the watch data is changes × size × members, per minute.\n",
        crate::fleet::SETTLE.as_secs(),
        f.sizes
            .iter()
            .find_map(|z| z.rollout.as_ref().map(|r| r.steps.clone()))
            .unwrap_or_default(),
        f.sizes
            .iter()
            .find_map(|z| z.rollout.as_ref().map(|r| r.hold.clone()))
            .unwrap_or_default(),
        f.sizes
            .iter()
            .find_map(|z| z.rollout.as_ref().map(|r| r.rps_per_member))
            .unwrap_or_default(),
    );
    let mut header = String::from("| members | | window |");
    let mut rule = String::from("|---|---|---|");
    for verb in VERBS {
        let _ = write!(header, " {verb} |");
        rule.push_str("---|");
    }
    let _ = writeln!(
        s,
        "{header} total | writes | writes per member per 10 s | object changes | object size | watch data to the members | by verb and resource, per minute |\n{rule}---|---|---|---|---|---|---|"
    );
    for size in &f.sizes {
        requests_row(s, "steady state", size, &size.steady);
    }
    for size in &f.sizes {
        if let Some(r) = &size.rollout {
            let label = if r.promoted {
                "rollout (to promoted)".to_string()
            } else {
                format!(
                    "rollout (**not promoted**: {})",
                    r.final_phase.replace('|', "/")
                )
            };
            requests_row(s, &label, size, &r.window);
        }
    }
    let _ = writeln!(
        s,
        "\nAt steady state each member applies its own key of the ConfigMap `serin-NAME-members` once per report \
         interval (10 s, ±10% jitter), which only the leader reads (every half interval); the leader renews the Lease \
         every 7.5 s (a GET and an update), writes its aggregate to `status.fleet` when the membership changes or at \
         most every 30 s while its numbers move, and every other member reads the Lease every 2 s to notice a dead \
         leader (client-go's leader election does the same). The watch on the object stays open (it is renewed every \
         290 s), so a window may count none. The lease costs the same 8 writes a minute whatever the fleet's size \
         (client-go's leader election renews every 2 s, serin every half of the lease), so per member it weighs most \
         in small fleets. In a rollout every member also reports at once \
         when it applies a new step, the leader moves the steps (status merge patches), and a step cannot advance \
         before the reports that carry its requests: each step takes about one report interval."
    );
    if !f.notes.is_empty() {
        let _ = writeln!(s);
    }
    for n in &f.notes {
        let _ = writeln!(s, "- note: {n}");
    }
}
