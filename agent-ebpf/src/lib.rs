#![no_std]
// Empty: this crate exists for its binary; the library target lets the agent's build script
// depend on it so cargo rebuilds the programs when they change.
