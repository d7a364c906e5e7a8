//! nodeward: the node agent and its CLI.
pub mod api;
pub mod app;
pub mod ca;
pub mod cli;
pub mod datapath;
pub mod dns;
pub mod endpoints;
pub mod flowapi;
pub mod flows;
pub mod http;
pub mod identity;
pub mod issuer;
pub mod metrics;
pub mod policy;
pub mod services;
pub mod source;
pub mod tunnel;

/// An error and its causes on one line (`what failed: why: why`), skipping a cause whose text
/// the line already holds (thiserror messages often embed their source).
#[must_use]
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}
