//! Separate BPF functions: each keeps its stack frame out of its caller's (the frames of a
//! call chain must add up to at most 512 bytes).
//!
//! Such a function returns one scalar: [`code`] of its `Result`, turned back by [`result`].
//! A `#[inline(never)]` function that returns nothing, or an aggregate such as `Result<T, u8>`
//! (returned through a pointer), leaves in r0 whatever was last put there; when that is a stack
//! pointer, the verifier rejects the program ("cannot return stack pointer to the caller").

use agent_common::drop_reason;

/// `NONE` for `Ok`, else the drop reason.
#[inline(always)]
pub const fn code(result: Result<(), u8>) -> u8 {
    match result {
        Ok(()) => drop_reason::NONE,
        Err(reason) => reason,
    }
}

/// The `Result` a [`code`] stands for.
#[inline(always)]
pub const fn result(code: u8) -> Result<(), u8> {
    if code == drop_reason::NONE {
        Ok(())
    } else {
        Err(code)
    }
}
