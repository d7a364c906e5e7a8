//! nodeward: the node agent and its CLI.
pub mod cli;
pub mod datapath;
pub mod policy;
pub mod source;
