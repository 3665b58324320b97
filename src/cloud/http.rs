//! The one place absconda's HTTPS clients get their trust roots.
//!
//! The roots are the system store (`SSL_CERT_FILE` and `SSL_CERT_DIR` are
//! honoured, as OpenSSL does), or, when that is empty or missing (a `FROM
//! scratch` CI image), Mozilla's roots compiled into the binary. The CA file
//! of the builder's `ca_file:` or of `ABSCONDA_CA_FILE` is added to them, for
//! private endpoints and TLS-intercepting proxies. An `http://` endpoint
//! needs no roots at all, so a client can always be built.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::CloudError;

/// The environment variable naming an extra CA file (PEM).
pub const CA_FILE_ENV: &str = "ABSCONDA_CA_FILE";

/// The builder's `ca_file:`, set when its cloud client is made.
static CA_FILE: Mutex<Option<PathBuf>> = Mutex::new(None);

/// Sets the extra CA file of the builder being worked on (`ca_file:`).
pub fn set_ca_file(path: Option<PathBuf>) {
    if let Ok(mut guard) = CA_FILE.lock() {
        *guard = path;
    }
}

/// The extra CA file in effect: the builder's `ca_file:`, else `ABSCONDA_CA_FILE`.
pub fn extra_ca_file() -> Option<PathBuf> {
    let configured = CA_FILE.lock().ok().and_then(|g| g.clone());
    configured.or_else(|| {
        std::env::var_os(CA_FILE_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
}

/// Where the base roots came from, for `-v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootSource {
    System,
    BuiltIn,
}

/// Certificates that can serve as trust anchors; those that cannot are dropped.
fn usable(ders: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    ders.into_iter()
        .filter(|der| {
            let mut store = rustls::RootCertStore::empty();
            store
                .add(rustls::pki_types::CertificateDer::from(der.as_slice()))
                .is_ok()
        })
        .collect()
}

/// The system's roots, or Mozilla's when the system has none usable.
fn base_roots() -> &'static (RootSource, Vec<Vec<u8>>) {
    static ROOTS: OnceLock<(RootSource, Vec<Vec<u8>>)> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::debug!(error = %e, "while loading the system's CA certificates");
        }
        let system = usable(found.certs.iter().map(|c| c.to_vec()).collect());
        pick_roots(system)
    })
}

fn pick_roots(system: Vec<Vec<u8>>) -> (RootSource, Vec<Vec<u8>>) {
    if system.is_empty() {
        let built_in: Vec<Vec<u8>> = webpki_root_certs::TLS_SERVER_ROOT_CERTS
            .iter()
            .map(|c| c.to_vec())
            .collect();
        (RootSource::BuiltIn, built_in)
    } else {
        (RootSource::System, system)
    }
}

/// What the trust roots are, in words: for `-v`.
fn describe(source: RootSource, count: usize, extra: Option<(&Path, usize)>) -> String {
    let mut text = match source {
        RootSource::System => format!(
            "the system's CA store ({count} certificates; SSL_CERT_FILE and SSL_CERT_DIR are honoured)"
        ),
        RootSource::BuiltIn => format!(
            "Mozilla's roots built into absconda ({count} certificates), because the system's CA \
             store is empty or missing (SSL_CERT_FILE, SSL_CERT_DIR, the usual bundle paths)"
        ),
    };
    if let Some((path, n)) = extra {
        text.push_str(&format!(
            " plus {n} from the CA file `{}` (`ca_file:` or {CA_FILE_ENV})",
            path.display()
        ));
    }
    text
}

/// Says at `-v` which trust roots the HTTPS clients use, once per
/// combination (every client is built through [`builder`]).
fn announce(text: String) {
    static SAID: Mutex<Vec<String>> = Mutex::new(Vec::new());
    if let Ok(mut said) = SAID.lock()
        && !said.contains(&text)
    {
        tracing::info!("trust roots for HTTPS: {text}");
        said.push(text);
    }
}

/// Whether a transport error is the server's certificate being refused
/// (unknown issuer, expired, wrong name), which retrying does not change.
pub fn is_certificate_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(e) = next {
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(e), inner].into_iter().flatten() {
            if matches!(
                candidate.downcast_ref::<rustls::Error>(),
                Some(rustls::Error::InvalidCertificate(_))
            ) || candidate
                .to_string()
                .starts_with("invalid peer certificate")
            {
                return true;
            }
        }
        next = e.source();
    }
    false
}

/// The certificates of a PEM CA file, or a config error naming it.
pub fn read_ca_file(path: &Path) -> Result<Vec<reqwest::Certificate>, CloudError> {
    let bad = |why: String| CloudError::Config {
        message: format!("CA file `{}` {why}", path.display()),
    };
    let pem = std::fs::read(path).map_err(|e| bad(format!("cannot be read: {e}")))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .map_err(|e| bad(format!("is not a PEM certificate bundle: {e}")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// The trust roots every client uses, DER-encoded: the base roots plus
/// the CA file in effect. The websocket tunnels build their TLS from these.
pub fn root_ders() -> Result<Vec<Vec<u8>>, CloudError> {
    let (_, base) = base_roots();
    let mut roots = base.clone();
    if let Some(path) = extra_ca_file() {
        let pem = std::fs::read(&path).map_err(|e| CloudError::Config {
            message: format!("CA file `{}` cannot be read: {e}", path.display()),
        })?;
        // Checked by `read_ca_file` for the messages; the DER is what rustls takes.
        read_ca_file(&path)?;
        roots.extend(pem_certificates(&pem));
    }
    Ok(roots)
}

/// A rustls client config with absconda's trust roots, for the clients
/// that run TLS over a stream of their own (websockets, the registry API
/// through a builder).
pub fn tls_config() -> Result<std::sync::Arc<rustls::ClientConfig>, CloudError> {
    let mut roots = rustls::RootCertStore::empty();
    for der in root_ders()? {
        let _ = roots.add(rustls::pki_types::CertificateDer::from(der));
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| CloudError::Config {
            message: format!("TLS setup failed: {e}"),
        })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(std::sync::Arc::new(config))
}

/// The DER bodies of the `CERTIFICATE` blocks of a PEM bundle.
fn pem_certificates(pem: &[u8]) -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let text = String::from_utf8_lossy(pem);
    let mut out = Vec::new();
    let mut inside: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if line == "-----BEGIN CERTIFICATE-----" {
            inside = Some(String::new());
        } else if line == "-----END CERTIFICATE-----" {
            if let Some(b64) = inside.take()
                && let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64)
            {
                out.push(der);
            }
        } else if let Some(b) = inside.as_mut() {
            b.push_str(line);
        }
    }
    out
}

/// A client builder with absconda's trust roots; every HTTP client starts here.
///
/// `tls_certs_only` makes reqwest verify against exactly these roots with
/// rustls's WebPKI verifier. Without it reqwest uses its platform verifier,
/// which loads the system store itself and refuses to build a client at all
/// when that is empty, even for `http://` URLs.
pub fn builder() -> Result<reqwest::ClientBuilder, CloudError> {
    let (source, base) = base_roots();
    let mut roots = Vec::with_capacity(base.len() + 1);
    for der in base {
        // Already checked to be usable, so this does not fail.
        if let Ok(c) = reqwest::Certificate::from_der(der) {
            roots.push(c);
        }
    }
    let path = extra_ca_file();
    let mut extra_count = 0;
    if let Some(path) = &path {
        let extra = read_ca_file(path)?;
        extra_count = extra.len();
        roots.extend(extra);
    }
    announce(describe(
        *source,
        base.len(),
        path.as_deref().map(|p| (p, extra_count)),
    ));
    Ok(reqwest::Client::builder().tls_certs_only(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_system_roots_falls_back_to_the_built_in_ones() {
        let (source, roots) = pick_roots(Vec::new());
        assert_eq!(source, RootSource::BuiltIn);
        assert!(roots.len() > 100, "{}", roots.len());
        assert_eq!(usable(roots.clone()).len(), roots.len());
    }

    #[test]
    fn the_roots_are_described_for_verbose_output() {
        let text = describe(RootSource::BuiltIn, 146, None);
        assert!(
            text.contains("Mozilla's roots built into absconda (146"),
            "{text}"
        );
        let text = describe(
            RootSource::System,
            140,
            Some((Path::new("/etc/corp-ca.pem"), 2)),
        );
        assert!(
            text.contains("system's CA store (140")
                && text.contains("plus 2 from the CA file `/etc/corp-ca.pem`"),
            "{text}"
        );
    }

    #[test]
    fn unusable_certificates_are_dropped() {
        assert!(usable(vec![b"not a certificate".to_vec()]).is_empty());
    }

    #[test]
    fn a_bad_ca_file_is_a_config_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = read_ca_file(&missing).unwrap_err().to_string();
        assert!(
            e.contains("missing.pem") && e.contains("cannot be read"),
            "{e}"
        );
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "hello\n").unwrap();
        let e = read_ca_file(&empty).unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
    }

    #[tokio::test]
    async fn a_client_builds_with_no_roots_at_all() {
        let client = reqwest::Client::builder()
            .tls_certs_only(Vec::new())
            .build();
        assert!(client.is_ok());
    }
}
