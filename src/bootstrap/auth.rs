//! The shared-secret token and the challenge–response handshake.
//!
//! The token never crosses the wire. Each side sends a fresh 32-byte nonce; the client proves it
//! knows the token with `HMAC-SHA256(token, "rsmsg-bootstrap-v1 client" || server_nonce ||
//! client_nonce)` and the manager answers with `HMAC-SHA256(token, "rsmsg-bootstrap-v1 server" ||
//! client_nonce || server_nonce)`, so a client also knows it talks to a manager holding the token
//! (a stranger cannot pose as the manager and hand out forged descriptors). Fresh nonces on both
//! sides defeat replay; distinct labels defeat reflection. Proofs are compared in constant time
//! (`hmac`'s `verify_slice`).

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use thiserror::Error;

use super::wire::NONCE_LEN;

/// The environment variable a token may be taken from.
pub const TOKEN_ENV: &str = "RSMSG_TOKEN";
/// The shortest token accepted, in bytes.
pub const MIN_TOKEN_LEN: usize = 8;
/// The longest token accepted, in bytes.
pub const MAX_TOKEN_LEN: usize = 1024;

const CLIENT_LABEL: &[u8] = b"rsmsg-bootstrap-v1 client";
const SERVER_LABEL: &[u8] = b"rsmsg-bootstrap-v1 server";

/// Why a token could not be obtained. Messages never contain the token itself.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The token's length is outside `MIN_TOKEN_LEN..=MAX_TOKEN_LEN`.
    #[error("token of {len} bytes, expected {MIN_TOKEN_LEN}..={MAX_TOKEN_LEN}")]
    Length {
        /// The length found.
        len: usize,
    },
    /// The token file could not be read.
    #[error("cannot read the token file {path}")]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No token was given on the command line, in a file or in the environment.
    #[error("no token: pass one, name a token file, or set {TOKEN_ENV}")]
    Missing,
    /// The environment variable is not valid Unicode.
    #[error("{TOKEN_ENV} is not valid Unicode")]
    NotUnicode,
}

/// The shared secret that lets a client use the manager.
///
/// `Debug` prints `Token(<redacted>)`; there is no `Display`, and nothing in this crate logs it.
/// The bytes are overwritten on drop (best effort).
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    /// Wraps token bytes.
    ///
    /// # Errors
    /// [`TokenError::Length`] outside `MIN_TOKEN_LEN..=MAX_TOKEN_LEN`.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<Self, TokenError> {
        let bytes = bytes.into();
        if !(MIN_TOKEN_LEN..=MAX_TOKEN_LEN).contains(&bytes.len()) {
            return Err(TokenError::Length { len: bytes.len() });
        }
        Ok(Self(bytes))
    }

    /// Reads a token from a file; one trailing newline (`\n` or `\r\n`) is removed.
    ///
    /// # Errors
    /// The file cannot be read, is larger than [`MAX_TOKEN_LEN`] + 2 bytes, or the token has a
    /// bad length.
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        let file_err = |source| TokenError::File {
            path: path.to_owned(),
            source,
        };
        let file = std::fs::File::open(path).map_err(file_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_TOKEN_LEN as u64 + 3)
            .read_to_end(&mut bytes)
            .map_err(file_err)?;
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        Self::new(bytes)
    }

    /// Reads the token from the `RSMSG_TOKEN` environment variable.
    ///
    /// # Errors
    /// [`TokenError::Missing`] when unset, [`TokenError::NotUnicode`], or a bad length.
    pub fn from_env() -> Result<Self, TokenError> {
        match std::env::var(TOKEN_ENV) {
            Ok(s) => Self::new(s),
            Err(std::env::VarError::NotPresent) => Err(TokenError::Missing),
            Err(std::env::VarError::NotUnicode(_)) => Err(TokenError::NotUnicode),
        }
    }

    /// The token a command line resolves to: an explicit value first, then a file, then the
    /// environment.
    ///
    /// # Errors
    /// As [`Self::new`], [`Self::from_file`] or [`Self::from_env`] for the source used.
    pub fn resolve(explicit: Option<&str>, file: Option<&Path>) -> Result<Self, TokenError> {
        if let Some(t) = explicit {
            return Self::new(t);
        }
        if let Some(p) = file {
            return Self::from_file(p);
        }
        Self::from_env()
    }

    fn mac(&self, label: &[u8], first: &[u8; NONCE_LEN], second: &[u8; NONCE_LEN]) -> Hmac<Sha256> {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(label);
        mac.update(first);
        mac.update(second);
        mac
    }

    /// The client's proof for a handshake.
    pub fn client_proof(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        self.mac(CLIENT_LABEL, server_nonce, client_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// The manager's proof for a handshake.
    pub fn server_proof(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
    ) -> [u8; NONCE_LEN] {
        self.mac(SERVER_LABEL, client_nonce, server_nonce)
            .finalize()
            .into_bytes()
            .into()
    }

    /// Checks a client's proof in constant time.
    pub fn verify_client(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        proof: &[u8; NONCE_LEN],
    ) -> bool {
        self.mac(CLIENT_LABEL, server_nonce, client_nonce)
            .verify_slice(proof)
            .is_ok()
    }

    /// Checks the manager's proof in constant time.
    pub fn verify_server(
        &self,
        client_nonce: &[u8; NONCE_LEN],
        server_nonce: &[u8; NONCE_LEN],
        proof: &[u8; NONCE_LEN],
    ) -> bool {
        self.mac(SERVER_LABEL, client_nonce, server_nonce)
            .verify_slice(proof)
            .is_ok()
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// A fresh nonce from the kernel's random source.
///
/// # Errors
/// `/dev/urandom` cannot be read.
pub fn nonce() -> std::io::Result<[u8; NONCE_LEN]> {
    let mut n = [0u8; NONCE_LEN];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut n)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_check_and_differ() {
        let t = Token::new("correct horse").unwrap();
        let other = Token::new("battery staple").unwrap();
        let (c, s) = (nonce().unwrap(), nonce().unwrap());
        assert_ne!(c, s);
        let p = t.client_proof(&c, &s);
        assert!(t.verify_client(&c, &s, &p));
        assert!(!other.verify_client(&c, &s, &p));
        assert!(
            !t.verify_client(&s, &c, &p),
            "nonces are bound to their roles"
        );
        // A client proof reflected back is not a server proof.
        assert!(!t.verify_server(&c, &s, &p));
        let sp = t.server_proof(&c, &s);
        assert!(t.verify_server(&c, &s, &sp));
        let mut bad = sp;
        bad[31] ^= 1;
        assert!(!t.verify_server(&c, &s, &bad));
    }

    #[test]
    fn hmac_matches_rfc4231_case_2() {
        // RFC 4231 test case 2 (key "Jefe"), to show the primitive is HMAC-SHA256 as documented.
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let out: [u8; 32] = mac.finalize().into_bytes().into();
        let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn token_never_printed() {
        let t = Token::new("super-secret-value").unwrap();
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn token_sources() {
        assert!(matches!(
            Token::new("short"),
            Err(TokenError::Length { len: 5 })
        ));
        assert!(Token::new(vec![b'x'; MAX_TOKEN_LEN + 1]).is_err());
        let dir = std::env::temp_dir().join(format!("rsmsg-token-{}", std::process::id()));
        std::fs::write(&dir, "file-token-123\r\n").unwrap();
        let t = Token::resolve(None, Some(&dir)).unwrap();
        assert_eq!(t.0, b"file-token-123");
        let e = Token::from_file(Path::new("/nonexistent/rsmsg-token")).unwrap_err();
        assert!(matches!(e, TokenError::File { .. }));
        std::fs::remove_file(&dir).unwrap();
        let t = Token::resolve(Some("explicit-1"), Some(&dir)).unwrap();
        assert_eq!(t.0, b"explicit-1");
    }
}
