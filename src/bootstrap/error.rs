//! Errors of the bootstrap layer.

use std::io;

use thiserror::Error;

use super::auth::TokenError;
use super::wire::{DecodeError, ErrorCode, RendezvousId};

/// Everything that can fail in the manager or its client. Messages name the step that failed and
/// never contain the token.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// The TCP connection to the manager could not be made.
    #[error("cannot connect to the manager at {addr}")]
    Connect {
        /// The address tried.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The manager could not bind its listening socket.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A socket operation failed.
    #[error("I/O error while {step}")]
    Io {
        /// The step.
        step: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The step did not complete in time.
    #[error("timed out while {step}")]
    Timeout {
        /// The step.
        step: &'static str,
    },
    /// The other end closed the connection.
    #[error("the manager closed the connection while {step}")]
    Disconnected {
        /// The step.
        step: &'static str,
    },
    /// A frame from the other end could not be decoded.
    #[error("malformed frame from the manager while {step}")]
    Protocol {
        /// The step.
        step: &'static str,
        /// The decoding error.
        #[source]
        source: DecodeError,
    },
    /// The manager replied with a message that does not answer the request.
    #[error("unexpected {got} reply from the manager while {step}")]
    UnexpectedReply {
        /// The step.
        step: &'static str,
        /// The kind of reply received.
        got: &'static str,
    },
    /// An earlier failure left this client's connection in an unknown state.
    #[error("the connection to the manager failed earlier: connect again")]
    Broken,
    /// The listener did not answer a connection request in time.
    #[error("{peer} did not answer connection request {id} in time")]
    NoAnswer {
        /// The rendezvous.
        id: RendezvousId,
        /// The listener's name.
        peer: String,
    },
    /// The manager could not prove that it holds the token: it is not the manager we trust.
    #[error("the manager failed to prove it holds the token")]
    ManagerNotAuthentic,
    /// The manager answered with an error.
    #[error("manager error while {step}: {code}: {message}")]
    Remote {
        /// The step.
        step: &'static str,
        /// The error code.
        code: ErrorCode,
        /// The manager's explanation.
        message: String,
    },
    /// A value given by the caller is invalid.
    #[error("invalid {what}")]
    InvalidInput {
        /// What was invalid.
        what: &'static str,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// The token could not be obtained.
    #[error("token unavailable")]
    Token(#[from] TokenError),
    /// The kernel's random source failed.
    #[error("cannot read random bytes for a nonce")]
    Random(#[source] io::Error),
    /// A thread could not be started.
    #[error("cannot start the {what} thread")]
    Thread {
        /// Which thread.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

impl BootstrapError {
    /// The manager's error code, when the manager answered with an error.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Self::Remote { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether the failure is about reaching the manager (connect, I/O, timeout, disconnect)
    /// rather than about the request: retrying against a manager that comes back may succeed.
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. }
                | Self::Io { .. }
                | Self::Timeout { .. }
                | Self::Disconnected { .. }
                | Self::Broken
        ) || matches!(self.code(), Some(ErrorCode::Busy | ErrorCode::ShuttingDown))
    }
}
