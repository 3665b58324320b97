//! RS256-signed JSON Web Tokens (RFC 7515/7519), the one signing code behind
//! every assertion absconda makes: Entra's certificate client assertions
//! ([`super::azure_auth`]) and a Google service account key's self-signed
//! tokens and JWT-bearer assertions ([`super::gcp_token`]). The key comes
//! from a PEM text, as key files and certificate files hold it.

use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
use aws_lc_rs::signature::RSA_PKCS1_SHA256;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::Value;

/// The PEM blocks of `label` in `text`, decoded.
pub fn pem_blocks(text: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(&begin) {
        let after = &rest[i + begin.len()..];
        let Some(j) = after.find(&end) else { break };
        let b64: String = after[..j].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &after[j + end.len()..];
    }
    out
}

/// The RSA key of the first unencrypted `PRIVATE KEY` (PKCS#8) or
/// `RSA PRIVATE KEY` (PKCS#1) block of `pem`. The error never quotes the key.
pub fn rsa_key_from_pem(pem: &str) -> Result<RsaKeyPair, String> {
    let unusable = |e: aws_lc_rs::error::KeyRejected| {
        format!("the private key is not an RSA key absconda can use: {e}")
    };
    if let Some(der) = pem_blocks(pem, "PRIVATE KEY").into_iter().next() {
        RsaKeyPair::from_pkcs8(&der).map_err(unusable)
    } else if let Some(der) = pem_blocks(pem, "RSA PRIVATE KEY").into_iter().next() {
        RsaKeyPair::from_der(&der).map_err(unusable)
    } else {
        Err("there is no unencrypted `PRIVATE KEY` or `RSA PRIVATE KEY` PEM block".into())
    }
}

/// `header.claims.signature`, base64url without padding, signed with
/// RSASSA-PKCS1-v1_5 SHA-256. `header` should say `"alg": "RS256"`.
pub fn sign_rs256(key: &RsaKeyPair, header: &Value, claims: &Value) -> Result<String, String> {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut sig = vec![0u8; key.public_modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        signing_input.as_bytes(),
        &mut sig,
    )
    .map_err(|_| "signing with the RSA key failed".to_string())?;
    Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{self, KeyPair as _};

    fn pem_of(pair: &RsaKeyPair) -> String {
        let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(pair).unwrap();
        format!(
            "junk before\n-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            STANDARD.encode(der.as_ref())
        )
    }

    #[test]
    fn a_signed_token_verifies_with_the_public_key() {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let key = rsa_key_from_pem(&pem_of(&pair)).unwrap();
        let header = serde_json::json!({"alg": "RS256", "typ": "JWT"});
        let claims = serde_json::json!({"iss": "a@b", "exp": 2});
        let jwt = sign_rs256(&key, &header, &claims).unwrap();
        let (input, sig) = jwt.rsplit_once('.').unwrap();
        let public = signature::UnparsedPublicKey::new(
            &signature::RSA_PKCS1_2048_8192_SHA256,
            pair.public_key().as_ref(),
        );
        public
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(sig).unwrap())
            .unwrap();
        let (_, payload) = input.split_once('.').unwrap();
        let back: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap();
        assert_eq!(back, claims);
    }

    #[test]
    fn no_key_or_a_broken_key_is_an_error_without_the_text() {
        let err = rsa_key_from_pem("nothing here").unwrap_err();
        assert!(err.contains("PRIVATE KEY"), "{err}");
        let err =
            rsa_key_from_pem("-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n-----END PRIVATE KEY-----")
                .unwrap_err();
        assert!(!err.contains("U0VDUkVU"), "{err}");
    }
}
