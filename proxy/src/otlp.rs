//! Trace export: the data plane's spans, for an OpenTelemetry collector over
//! OTLP/HTTP (protobuf).
//!
//! A worker encodes each request's span into a batch buffer it owns
//! ([`encode::encode_span`]), without allocating: what it must never do is
//! slow the request path. The messages are encoded by hand ([`encode`]): the
//! generated OTLP crates bring gRPC and an HTTP client stack, more to build
//! than the whole data plane.

mod encode;
