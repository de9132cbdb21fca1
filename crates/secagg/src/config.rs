//! One session's parameters (session id, clients, threshold, vector length)
//! and the named limits that bound them.

use serde::{Deserialize, Serialize};

use crate::ClientId;

/// Most clients in one session. The server holds every client's encrypted
/// shares for every other client between rounds 1 and 2, n·(n−1)·
/// [`crate::SHARE_CIPHERTEXT_BYTES`] = 1024·1023·96 B ≈ 100 MB at this
/// limit, and as many unmasking shares (40 B each) in round 3.
pub const CLIENTS_MAX: u32 = 1024;

/// Longest input vector. The server keeps one running sum of this many `u32`
/// (256 MiB at this limit, a 67M-parameter model); each client its input.
pub const VECTOR_LEN_MAX: u32 = 1 << 26;

/// What every client and the server of one session agree on before it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Config {
    /// Names the session. It is bound into every derived key and into every
    /// share ciphertext's associated data, so that a message of one session
    /// is refused in another.
    pub session: u64,
    /// n: the clients are `0..clients`.
    pub clients: u32,
    /// t: shares needed to rebuild a secret, and the fewest clients that may
    /// take part in any round. `clients / 2 < threshold <= clients`.
    pub threshold: u32,
    /// Elements in every client's input and in the sum.
    pub vector_len: u32,
}

impl Config {
    /// Checks the limits; the reason names the field.
    ///
    /// The threshold must be a strict majority: shares of one client's
    /// secrets go to n clients, so a server that told two halves of them
    /// different stories (this client survived; it dropped) could collect t
    /// shares of both its self-mask seed and its mask key only if 2t ≤ n.
    pub fn validate(&self) -> Result<(), String> {
        if self.clients < 2 || self.clients > CLIENTS_MAX {
            return Err(format!("clients = {}: must be in 2..={CLIENTS_MAX}", self.clients));
        }
        if self.threshold <= self.clients / 2 || self.threshold > self.clients {
            return Err(format!(
                "threshold = {}: must be a strict majority of the {} clients, in {}..={}",
                self.threshold,
                self.clients,
                self.clients / 2 + 1,
                self.clients
            ));
        }
        if self.vector_len == 0 || self.vector_len > VECTOR_LEN_MAX {
            return Err(format!(
                "vector_len = {}: must be in 1..={VECTOR_LEN_MAX}",
                self.vector_len
            ));
        }
        Ok(())
    }

    pub(crate) fn contains(&self, client: ClientId) -> bool {
        client < self.clients
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(clients: u32, threshold: u32, vector_len: u32) -> Config {
        Config {
            session: 1,
            clients,
            threshold,
            vector_len,
        }
    }

    #[test]
    fn limits_name_the_field() {
        assert_eq!(config(10, 7, 100).validate(), Ok(()));
        assert_eq!(config(2, 2, 1).validate(), Ok(()));
        assert_eq!(
            config(1, 1, 1).validate(),
            Err(format!("clients = 1: must be in 2..={CLIENTS_MAX}"))
        );
        assert_eq!(
            config(CLIENTS_MAX + 1, CLIENTS_MAX, 1).validate(),
            Err(format!("clients = 1025: must be in 2..={CLIENTS_MAX}"))
        );
        assert_eq!(
            config(10, 5, 100).validate(),
            Err("threshold = 5: must be a strict majority of the 10 clients, in 6..=10".into())
        );
        assert_eq!(
            config(10, 11, 100).validate(),
            Err("threshold = 11: must be a strict majority of the 10 clients, in 6..=10".into())
        );
        assert_eq!(
            config(10, 7, 0).validate(),
            Err(format!("vector_len = 0: must be in 1..={VECTOR_LEN_MAX}"))
        );
        assert!(config(10, 7, VECTOR_LEN_MAX).validate().is_ok());
        assert!(config(10, 7, VECTOR_LEN_MAX + 1).validate().is_err());
    }
}
