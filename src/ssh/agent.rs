//! The agent a build step reaches through agent forwarding (`--ssh`).
//!
//! Either the client's own agent (a Unix socket, `SSH_AUTH_SOCK`), whose
//! bytes are relayed unchanged, or [`KeyAgent`]: key files loaded in this
//! process (passphrases asked here) and an SSH agent protocol answered
//! here, on the forwarded channel itself. The private keys never leave the
//! client: the builder gets public keys and signatures, nothing else, so no
//! key material is ever written there and no agent program runs anywhere.
//!
//! [`KeyAgent`] answers the two requests a build needs, listing identities
//! and signing (with the rsa-sha2-256/512 flags for RSA keys), and refuses
//! everything else (adding or removing keys, locking): a process on the
//! builder can use the keys while the build runs, never read or change them.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use russh::keys::ssh_encoding::Encode;
use russh::keys::ssh_key::private::KeypairData;
use russh::keys::{HashAlg, PrivateKey};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const FAILURE: u8 = 5;
const REQUEST_IDENTITIES: u8 = 11;
const IDENTITIES_ANSWER: u8 = 12;
const SIGN_REQUEST: u8 = 13;
const SIGN_RESPONSE: u8 = 14;
const RSA_SHA2_256: u32 = 2;
const RSA_SHA2_512: u32 = 4;
/// The largest request we read (OpenSSH's agent allows 256 KiB too).
const MAX_FRAME: usize = 256 * 1024;

/// What answers the agent channels the builder opens.
#[derive(Debug, Clone)]
pub enum AgentForward {
    /// The client's agent socket, relayed byte for byte.
    Socket(PathBuf),
    /// Keys loaded by absconda, served by absconda.
    Keys(Arc<KeyAgent>),
}

/// Private keys held in this process and served over the agent protocol.
pub struct KeyAgent {
    keys: Vec<Held>,
}

struct Held {
    key: PrivateKey,
    /// The public key in the wire format, as listed and as asked to sign.
    blob: Vec<u8>,
    comment: String,
}

impl fmt::Debug for KeyAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.fingerprints()).finish()
    }
}

impl KeyAgent {
    /// An agent holding `keys` (each with the comment it is listed under).
    pub fn new(keys: Vec<(PrivateKey, String)>) -> Result<KeyAgent, russh::keys::ssh_key::Error> {
        let keys = keys
            .into_iter()
            .map(|(key, comment)| {
                Ok(Held {
                    blob: key.public_key().key_data().encode_vec()?,
                    key,
                    comment,
                })
            })
            .collect::<Result<Vec<_>, russh::keys::ssh_key::Error>>()?;
        Ok(KeyAgent { keys })
    }

    /// The keys' SHA256 fingerprints, as `ssh-add -l` shows them.
    pub fn fingerprints(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|h| h.key.public_key().fingerprint(HashAlg::Sha256).to_string())
            .collect()
    }

    /// Answers agent requests on `stream` until the other side closes it.
    pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        mut stream: S,
    ) -> std::io::Result<()> {
        loop {
            let mut len = [0u8; 4];
            match stream.read_exact(&mut len).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let len = u32::from_be_bytes(len) as usize;
            if len > MAX_FRAME {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("an agent request of {len} bytes"),
                ));
            }
            let mut request = vec![0u8; len];
            stream.read_exact(&mut request).await?;
            let answer = self.answer(&request);
            let mut frame = Vec::with_capacity(answer.len() + 4);
            frame.extend_from_slice(&(answer.len() as u32).to_be_bytes());
            frame.extend_from_slice(&answer);
            stream.write_all(&frame).await?;
            stream.flush().await?;
        }
    }

    /// The answer to one request (without its length prefix).
    pub fn answer(&self, request: &[u8]) -> Vec<u8> {
        match request.split_first() {
            Some((&REQUEST_IDENTITIES, _)) => {
                let mut out = vec![IDENTITIES_ANSWER];
                out.extend_from_slice(&(self.keys.len() as u32).to_be_bytes());
                for h in &self.keys {
                    put_string(&mut out, &h.blob);
                    put_string(&mut out, h.comment.as_bytes());
                }
                out
            }
            Some((&SIGN_REQUEST, mut rest)) => self
                .sign_request(&mut rest)
                .map(|sig| {
                    let mut out = vec![SIGN_RESPONSE];
                    put_string(&mut out, &sig);
                    out
                })
                .unwrap_or_else(|| vec![FAILURE]),
            _ => vec![FAILURE],
        }
    }

    fn sign_request(&self, r: &mut &[u8]) -> Option<Vec<u8>> {
        let blob = get_string(r)?;
        let data = get_string(r)?;
        let flags = get_u32(r).unwrap_or(0);
        let held = self.keys.iter().find(|h| h.blob == blob)?;
        tracing::debug!(key = %held.comment, flags, "signing for the builder's agent channel");
        sign(&held.key, data, flags)
    }
}

/// The signature in the wire format (algorithm name and blob).
fn sign(key: &PrivateKey, data: &[u8], flags: u32) -> Option<Vec<u8>> {
    use russh::keys::signature::Signer;
    let signature: russh::keys::ssh_key::Signature = match key.key_data() {
        KeypairData::Rsa(rsa) => {
            let hash = if flags & RSA_SHA2_512 != 0 {
                Some(HashAlg::Sha512)
            } else if flags & RSA_SHA2_256 != 0 {
                Some(HashAlg::Sha256)
            } else {
                None
            };
            Signer::try_sign(&(rsa, hash), data).ok()?
        }
        other => Signer::try_sign(other, data).ok()?,
    };
    signature.encode_vec().ok()
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn get_u32(r: &mut &[u8]) -> Option<u32> {
    let (head, rest) = r.split_first_chunk::<4>()?;
    *r = rest;
    Some(u32::from_be_bytes(*head))
}

fn get_string<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = get_u32(r)? as usize;
    if r.len() < len {
        return None;
    }
    let (s, rest) = r.split_at(len);
    *r = rest;
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use russh::keys::PublicKey;

    const ED25519: &str = "ed25519";
    const RSA: &str = "rsa";

    /// A fresh key of that type, made by OpenSSH's `ssh-keygen` for this test.
    fn keygen(kind: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        let status = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", kind, "-N", "", "-f"])
            .arg(&path)
            .status()
            .expect("ssh-keygen (openssh-client) is needed by this test");
        assert!(status.success());
        std::fs::read_to_string(path).unwrap()
    }

    fn agent(kind: &str) -> (KeyAgent, PublicKey) {
        let key = PrivateKey::from_openssh(keygen(kind)).unwrap();
        let public = key.public_key().clone();
        (KeyAgent::new(vec![(key, "k".into())]).unwrap(), public)
    }

    fn sign_req(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut r = vec![SIGN_REQUEST];
        put_string(&mut r, blob);
        put_string(&mut r, data);
        r.extend_from_slice(&flags.to_be_bytes());
        r
    }

    fn verify(public: &PublicKey, data: &[u8], answer: &[u8]) -> russh::keys::ssh_key::Signature {
        use russh::keys::signature::Verifier;
        assert_eq!(answer[0], SIGN_RESPONSE);
        let mut r = &answer[1..];
        let sig = get_string(&mut r).unwrap();
        assert!(r.is_empty());
        let sig = russh::keys::ssh_key::Signature::try_from(sig).unwrap();
        public.key_data().verify(data, &sig).unwrap();
        sig
    }

    #[test]
    fn lists_and_signs_with_ed25519() {
        let (a, public) = agent(ED25519);
        let list = a.answer(&[REQUEST_IDENTITIES]);
        let blob = public.key_data().encode_vec().unwrap();
        let mut r = &list[1..];
        assert_eq!(list[0], IDENTITIES_ANSWER);
        assert_eq!(get_u32(&mut r), Some(1));
        assert_eq!(get_string(&mut r), Some(&blob[..]));
        assert_eq!(get_string(&mut r), Some(&b"k"[..]));
        assert!(r.is_empty());
        let answer = a.answer(&sign_req(&blob, b"session data", 0));
        verify(&public, b"session data", &answer);
    }

    #[test]
    fn rsa_signs_with_the_asked_hash() {
        let (a, public) = agent(RSA);
        let blob = public.key_data().encode_vec().unwrap();
        for (flags, alg) in [
            (RSA_SHA2_512, "rsa-sha2-512"),
            (RSA_SHA2_256, "rsa-sha2-256"),
        ] {
            let answer = a.answer(&sign_req(&blob, b"x", flags));
            let sig = verify(&public, b"x", &answer);
            assert_eq!(sig.algorithm().as_str(), alg);
        }
    }

    #[test]
    fn refuses_what_it_does_not_serve() {
        let (a, public) = agent(ED25519);
        let (_, other) = agent(RSA);
        let other_blob = other.key_data().encode_vec().unwrap();
        assert_eq!(a.answer(&sign_req(&other_blob, b"x", 0)), vec![FAILURE]);
        // add identity, remove all, lock, an extension, garbage, nothing
        for req in [
            &[17u8, 0, 0][..],
            &[19],
            &[22, 0, 0, 0, 0],
            &[27],
            &[13, 0, 0, 9],
            &[],
        ] {
            assert_eq!(a.answer(req), vec![FAILURE], "{req:?}");
        }
        let _ = public;
        assert!(!format!("{a:?}").contains("PRIVATE"));
    }

    #[tokio::test]
    async fn serves_frames_until_closed() {
        let (a, _) = agent(ED25519);
        let (mut client, server) = tokio::io::duplex(4096);
        let task = async move { a.serve(server).await };
        let talk = async move {
            client
                .write_all(&[0, 0, 0, 1, REQUEST_IDENTITIES])
                .await
                .unwrap();
            let mut len = [0u8; 4];
            client.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
            client.read_exact(&mut body).await.unwrap();
            assert_eq!(body[0], IDENTITIES_ANSWER);
            drop(client);
        };
        let (served, ()) = tokio::join!(task, talk);
        served.unwrap();
    }
}
