//! The postcopy state machine: None → Advise → Discard → Listening → Running → End, read and set
//! atomically. An illegal transition is an error that names both states.

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};

use serde::Serialize;

/// A state change that the postcopy state machine does not allow; it becomes
/// [`crate::Error::IllegalTransition`] with `?`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal postcopy state transition from {from} to {to}")]
pub struct IllegalTransition {
    /// Current state.
    pub from: PostcopyState,
    /// Requested state.
    pub to: PostcopyState,
}

/// Where the incoming side is in the postcopy flow (QEMU's `PostcopyState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[repr(u8)]
pub enum PostcopyState {
    /// Nothing advised yet.
    None = 0,
    /// The source advised postcopy: RAM was discarded, precopy may run.
    Advise = 1,
    /// Discards of dirty pages are being applied.
    Discard = 2,
    /// RAM is registered with userfaultfd; faults are served.
    Listening = 3,
    /// The guest runs on the destination.
    Running = 4,
    /// Postcopy ended; everything is cleaned up.
    End = 5,
}

impl PostcopyState {
    /// All states in order.
    pub const ALL: [PostcopyState; 6] = [
        PostcopyState::None,
        PostcopyState::Advise,
        PostcopyState::Discard,
        PostcopyState::Listening,
        PostcopyState::Running,
        PostcopyState::End,
    ];

    fn from_u8(v: u8) -> PostcopyState {
        match v {
            0 => PostcopyState::None,
            1 => PostcopyState::Advise,
            2 => PostcopyState::Discard,
            3 => PostcopyState::Listening,
            4 => PostcopyState::Running,
            _ => PostcopyState::End,
        }
    }

    /// Whether `self → to` is a legal step.
    pub fn can_go_to(self, to: PostcopyState) -> bool {
        use PostcopyState::*;
        matches!(
            (self, to),
            (None, Advise)
                | (Advise, Discard)
                | (Advise, Listening)
                | (Discard, Listening)
                | (Listening, Running)
                | (Advise | Discard | Listening | Running, End)
        )
    }

    /// Whether faults are being served (Listening or Running).
    pub fn is_listening(self) -> bool {
        matches!(self, PostcopyState::Listening | PostcopyState::Running)
    }
}

impl fmt::Display for PostcopyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            PostcopyState::None => "None",
            PostcopyState::Advise => "Advise",
            PostcopyState::Discard => "Discard",
            PostcopyState::Listening => "Listening",
            PostcopyState::Running => "Running",
            PostcopyState::End => "End",
        };
        f.write_str(s)
    }
}

/// An atomically read and set [`PostcopyState`].
#[derive(Debug, Default)]
pub struct StateCell(AtomicU8);

impl StateCell {
    /// A cell in state None.
    pub fn new() -> StateCell {
        StateCell(AtomicU8::new(PostcopyState::None as u8))
    }

    /// The current state.
    pub fn get(&self) -> PostcopyState {
        PostcopyState::from_u8(self.0.load(Ordering::Acquire))
    }

    /// Move to `to` if that is legal from the current state; returns the previous state.
    pub fn transition(&self, to: PostcopyState) -> Result<PostcopyState, IllegalTransition> {
        let mut cur = self.0.load(Ordering::Acquire);
        loop {
            let from = PostcopyState::from_u8(cur);
            if !from.can_go_to(to) {
                return Err(IllegalTransition { from, to });
            }
            match self.0.compare_exchange(cur, to as u8, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Ok(from),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_transition_is_legal_or_an_error_naming_both_states() {
        let legal = [
            (PostcopyState::None, PostcopyState::Advise),
            (PostcopyState::Advise, PostcopyState::Discard),
            (PostcopyState::Advise, PostcopyState::Listening),
            (PostcopyState::Discard, PostcopyState::Listening),
            (PostcopyState::Listening, PostcopyState::Running),
            (PostcopyState::Advise, PostcopyState::End),
            (PostcopyState::Discard, PostcopyState::End),
            (PostcopyState::Listening, PostcopyState::End),
            (PostcopyState::Running, PostcopyState::End),
        ];
        let mut illegal = 0;
        for from in PostcopyState::ALL {
            for to in PostcopyState::ALL {
                let cell = StateCell(AtomicU8::new(from as u8));
                let r = cell.transition(to);
                if legal.contains(&(from, to)) {
                    assert_eq!(r.ok(), Some(from));
                    assert_eq!(cell.get(), to);
                } else {
                    illegal += 1;
                    let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
                    assert_eq!(msg, format!("illegal postcopy state transition from {from} to {to}"));
                    assert_eq!(cell.get(), from, "a refused transition changes nothing");
                }
            }
        }
        assert_eq!(illegal, 36 - legal.len());
    }

    #[test]
    fn the_happy_path_runs_in_order() {
        let cell = StateCell::new();
        for s in [
            PostcopyState::Advise,
            PostcopyState::Discard,
            PostcopyState::Listening,
            PostcopyState::Running,
            PostcopyState::End,
        ] {
            assert!(cell.transition(s).is_ok());
        }
        assert_eq!(cell.get(), PostcopyState::End);
    }
}
