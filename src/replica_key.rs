//! What the replicas' shared secret keys, each with a key of its own derived from it (HKDF):
//! the signature on the relay address a lease holder publishes, and the TLS identity both ends
//! of the relay prove. Every replica derives the same Ed25519 key and presents it in a
//! self-signed certificate; each end accepts only a peer proving that key (mutual TLS, the key
//! pinned, TLS 1.3), so the relay's traffic is private and the secret itself never crosses the
//! network: someone who reads it there learns nothing that lets it in.
//!
//! Rotation: a replica may also accept the keys of other secrets (it presents and signs with
//! its own alone), so that replicas of the old and the new secret reach each other while they
//! are rolled: accept the new one everywhere, then present it (accepting the old), then drop
//! the old.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

/// A secret shorter than this (in bytes) is refused (the Secret the replicas create holds 43).
pub const MIN_SECRET_LEN: usize = 32;

/// HKDF salt: the derived keys belong to this use of the secret alone.
const SALT: &[u8] = b"gatehouse replicas";
/// HKDF info of the key that signs a lease holder's relay address.
const LEASE_INFO: &[u8] = b"lease relay signature v1";
/// HKDF info of the relay's TLS key (an Ed25519 seed).
const TLS_INFO: &[u8] = b"relay tls ed25519 v1";
/// ALPN of the relay: HTTP/2 (the replicas' clients), HTTP/1.1 (for people, and tests).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Why the replicas' key could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaKeyError {
    /// The secret is too short to key anything.
    #[error("the replicas' secret has {0} bytes; at least {MIN_SECRET_LEN} random ones are needed")]
    TooShort(usize),
    /// The certificate or a TLS configuration could not be built.
    #[error("the relay's TLS identity: {0}")]
    Tls(String),
}

/// The keys derived from the replicas' shared secret.
pub struct ReplicaKey {
    lease: [u8; 32],
    /// The lease keys of the secrets also accepted.
    also_lease: Vec<[u8; 32]>,
    /// What a peer may prove (subject public key infos): this replica's own key first, then
    /// those of the secrets also accepted.
    accepted: Vec<Vec<u8>>,
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for ReplicaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaKey").finish_non_exhaustive()
    }
}

impl ReplicaKey {
    /// The keys of `secret`: the same on every replica that shares it.
    pub fn derive(secret: &str) -> Result<ReplicaKey, ReplicaKeyError> {
        ReplicaKey::accepting(secret, &[])
    }

    /// The keys of `secret`, accepting also peers (and leases) of the secrets `also` (while
    /// the secret is rotated).
    pub fn accepting(secret: &str, also: &[&str]) -> Result<ReplicaKey, ReplicaKeyError> {
        let (lease, seed) = seeds(secret)?;
        let Identity { spki, cert, pkcs8 } = Identity::of(&seed)?;
        let mut also_lease = Vec::with_capacity(also.len());
        let mut accepted = vec![spki.clone()];
        for other in also {
            let (lease, seed) = seeds(other)?;
            also_lease.push(lease);
            accepted.push(Identity::of(&seed)?.spki);
        }
        let tls = |e: rustls::Error| ReplicaKeyError::Tls(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let pinned = Arc::new(PinnedKey {
            accepted: accepted.clone(),
            algorithms: provider.signature_verification_algorithms,
        });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .with_client_cert_verifier(pinned.clone())
            .with_single_cert(vec![cert.clone()], PrivateKeyDer::Pkcs8(pkcs8.clone_key()))
            .map_err(tls)?;
        server.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(pinned)
            .with_client_auth_cert(vec![cert], PrivateKeyDer::Pkcs8(pkcs8))
            .map_err(tls)?;
        Ok(ReplicaKey {
            lease,
            also_lease,
            accepted,
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The key that signs the relay address a lease holder publishes.
    pub fn lease_key(&self) -> &[u8] {
        &self.lease
    }

    /// Every key a lease holder's signature is accepted from: this one's first.
    pub fn lease_keys(&self) -> impl Iterator<Item = &[u8]> {
        std::iter::once(&self.lease[..]).chain(self.also_lease.iter().map(|k| &k[..]))
    }

    /// The relay's server side: it asks every client for the replicas' certificate.
    pub fn server_config(&self) -> Arc<rustls::ServerConfig> {
        self.server.clone()
    }

    /// A replica's client side: it proves the key, and accepts only a relay that does (no ALPN
    /// set: the HTTP client chooses).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        self.client.clone()
    }

    /// Whether two keys are the same (derived from the same secrets, accepting the same).
    pub fn same_as(&self, other: &ReplicaKey) -> bool {
        self.accepted == other.accepted
    }
}

/// The lease key and the TLS key's seed of `secret` (HKDF-SHA256, one label each).
fn seeds(secret: &str) -> Result<([u8; 32], [u8; 32]), ReplicaKeyError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(ReplicaKeyError::TooShort(secret.len()));
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, SALT).extract(secret.as_bytes());
    let expand = |info: &[u8]| {
        let mut out = [0u8; 32];
        prk.expand(&[info], ring::hkdf::HKDF_SHA256)
            .and_then(|okm| okm.fill(&mut out))
            .expect("32 bytes is within HKDF-SHA256's output");
        out
    };
    Ok((expand(LEASE_INFO), expand(TLS_INFO)))
}

/// A replica's TLS identity: the Ed25519 key of a seed, and a self-signed certificate for it.
struct Identity {
    /// The certificate's subject public key info: what a peer must prove.
    spki: Vec<u8>,
    cert: CertificateDer<'static>,
    pkcs8: PrivatePkcs8KeyDer<'static>,
}

impl Identity {
    fn of(seed: &[u8; 32]) -> Result<Identity, ReplicaKeyError> {
        let tls = |e: rcgen::Error| ReplicaKeyError::Tls(e.to_string());
        let pkcs8 = PrivatePkcs8KeyDer::from(ed25519_pkcs8(seed));
        let pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(&pkcs8, &rcgen::PKCS_ED25519)
            .map_err(tls)?;
        let spki = rcgen::PublicKeyData::subject_public_key_info(&pair);
        let cert = rcgen::CertificateParams::new(vec!["gatehouse-replica".to_owned()])
            .and_then(|params| params.self_signed(&pair))
            .map_err(tls)?
            .der()
            .clone();
        Ok(Identity { spki, cert, pkcs8 })
    }
}

/// The PKCS#8 (v1, RFC 8410) document of the Ed25519 key whose seed is `seed`: ring makes
/// such keys only from its own random source.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    // SEQUENCE { INTEGER 0, SEQUENCE { OID 1.3.101.112 }, OCTET STRING { OCTET STRING seed } }
    const PREFIX: [u8; 16] = [
        0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04,
        0x20,
    ];
    let mut der = PREFIX.to_vec();
    der.extend_from_slice(seed);
    der
}

/// Accepts a peer's certificate only when it carries the replicas' key; its proof of holding
/// that key is the handshake signature, checked as any TLS 1.3 one. Names, dates and issuers
/// say nothing here: the key is the identity.
#[derive(Debug)]
struct PinnedKey {
    /// The subject public key infos accepted.
    accepted: Vec<Vec<u8>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedKey {
    fn check(&self, cert: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        let parsed = webpki::EndEntityCert::try_from(cert).map_err(|_| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
        })?;
        let spki = parsed.subject_public_key_info();
        if !self.accepted.iter().any(|k| k.as_slice() == spki.as_ref()) {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ));
        }
        Ok(())
    }
}

/// The handshake signature checks, the same for either end: TLS 1.2 is never offered (both
/// ends are configured for 1.3 only), a TLS 1.3 signature is checked against the peer's key,
/// and only Ed25519 is asked for.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::General(
                "the relay speaks TLS 1.3 only".into(),
            ))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            vec![SignatureScheme::ED25519]
        }
    };
}

impl ServerCertVerifier for PinnedKey {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for PinnedKey {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    signature_checks!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn provider() -> rustls::crypto::CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef-a";
    const OTHER: &str = "0123456789abcdef0123456789abcdef-b";

    #[test]
    fn the_pkcs8_document_holds_the_seeds_key() {
        let seed = [7u8; 32];
        let from_doc =
            ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&ed25519_pkcs8(&seed))
                .expect("ring reads it");
        let from_seed = ring::signature::Ed25519KeyPair::from_seed_unchecked(&seed).unwrap();
        use ring::signature::KeyPair;
        assert_eq!(
            from_doc.public_key().as_ref(),
            from_seed.public_key().as_ref()
        );
    }

    #[test]
    fn every_replica_derives_the_same_keys_and_other_secrets_others() {
        let (a, b, c) = (
            ReplicaKey::derive(SECRET).unwrap(),
            ReplicaKey::derive(SECRET).unwrap(),
            ReplicaKey::derive(OTHER).unwrap(),
        );
        assert!(a.same_as(&b) && !a.same_as(&c));
        assert_eq!(a.lease_key(), b.lease_key());
        assert_ne!(a.lease_key(), c.lease_key());
        // Separate keys: the lease's is not the TLS key's public half.
        let spki = &a.accepted[0];
        assert_ne!(a.lease_key(), &spki[spki.len() - 32..]);
        assert!(matches!(
            ReplicaKey::derive("short"),
            Err(ReplicaKeyError::TooShort(5))
        ));
    }

    /// What a client shows the relay.
    enum Shows<'a> {
        /// A replica's key (its own configuration).
        Key(&'a ReplicaKey),
        /// Nothing: it trusts the relay's key but has none to show.
        Nothing,
        /// The certificate of `secret`'s key, signed for with the key of `signer` (`secret`
        /// itself: the certificate and its key), trusting the relay's key.
        Certificate { secret: &'a str, signer: &'a str },
    }

    /// A client that trusts `server`'s key and shows `shown`.
    fn client_config(server: &ReplicaKey, shown: Shows) -> Arc<rustls::ClientConfig> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedKey {
                accepted: vec![server.accepted[0].clone()],
                algorithms: provider().signature_verification_algorithms,
            }));
        match shown {
            Shows::Key(k) => k.client_config(),
            Shows::Nothing => Arc::new(builder.with_no_client_auth()),
            Shows::Certificate { secret, signer } => {
                let cert = Identity::of(&seeds(secret).unwrap().1).unwrap().cert;
                let key = Identity::of(&seeds(signer).unwrap().1).unwrap().pkcs8;
                let signing = rustls::crypto::ring::sign::any_eddsa_type(&key).unwrap();
                // (A resolver of its own: building from a certificate and a key that do not
                // belong together is refused otherwise.)
                let shown = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], signing));
                Arc::new(builder.with_client_cert_resolver(Arc::new(Always(shown))))
            }
        }
    }

    #[derive(Debug)]
    struct Always(Arc<rustls::sign::CertifiedKey>);

    impl rustls::client::ResolvesClientCert for Always {
        fn resolve(
            &self,
            _: &[&[u8]],
            _: &[SignatureScheme],
        ) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(self.0.clone())
        }

        fn has_certs(&self) -> bool {
            true
        }
    }

    /// One handshake of a client configured `client` with a server keyed `server`, and one
    /// byte echoed: whether the client, and the server, went through.
    async fn handshake(server: &ReplicaKey, client: Arc<rustls::ClientConfig>) -> (bool, bool) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server.server_config());
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.ok()?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.ok()?;
            tls.write_all(&byte).await.ok()?;
            tls.flush().await.ok()
        });
        let connector = tokio_rustls::TlsConnector::from(client);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let echoed = async {
            let mut tls = connector.connect(name, tcp).await.ok()?;
            tls.write_all(b"x").await.ok()?;
            tls.flush().await.ok()?;
            let mut byte = [0u8; 1];
            tls.read_exact(&mut byte).await.ok()?;
            Some(byte == *b"x")
        };
        let echoed = echoed.await.unwrap_or(false);
        (echoed, served.await.unwrap().is_some())
    }

    #[tokio::test]
    async fn only_peers_proving_the_replicas_key_get_through_either_way() {
        let (key, other) = (
            ReplicaKey::derive(SECRET).unwrap(),
            ReplicaKey::derive(OTHER).unwrap(),
        );
        let same = ReplicaKey::derive(SECRET).unwrap();
        assert_eq!(
            handshake(&key, client_config(&key, Shows::Key(&same))).await,
            (true, true)
        );
        // A client of another secret refuses the relay (before it shows anything).
        assert_eq!(
            handshake(&key, client_config(&key, Shows::Key(&other))).await,
            (false, false)
        );
        // The relay refuses a client that trusts it but shows no certificate, another key's
        // certificate, or the replicas' certificate without its key.
        for shown in [
            Shows::Nothing,
            Shows::Certificate {
                secret: OTHER,
                signer: OTHER,
            },
            Shows::Certificate {
                secret: SECRET,
                signer: OTHER,
            },
        ] {
            let (_, served) = handshake(&key, client_config(&key, shown)).await;
            assert!(!served, "the relay refuses it");
        }
        // (The last two are refused for what they show: the same client showing the
        // replicas' certificate with its key goes through.)
        let shown = Shows::Certificate {
            secret: SECRET,
            signer: SECRET,
        };
        assert_eq!(
            handshake(&key, client_config(&key, shown)).await,
            (true, true)
        );
    }

    /// While a secret is rotated: a replica of the new secret that also accepts the old one
    /// reaches, and is reached by, replicas of the old secret that accept the new; a third
    /// secret is refused by both.
    #[tokio::test]
    async fn a_rotation_keeps_every_replica_reachable() {
        const NEW: &str = "0123456789abcdef0123456789abcdef-new";
        let old_accepting_new = ReplicaKey::accepting(SECRET, &[NEW]).unwrap();
        let new_accepting_old = ReplicaKey::accepting(NEW, &[SECRET]).unwrap();
        let stranger = ReplicaKey::derive(OTHER).unwrap();
        for (server, client) in [
            (&old_accepting_new, &new_accepting_old),
            (&new_accepting_old, &old_accepting_new),
        ] {
            let config = client_config(server, Shows::Key(client));
            assert_eq!(handshake(server, config).await, (true, true));
        }
        let (_, served) = handshake(
            &old_accepting_new,
            client_config(
                &old_accepting_new,
                Shows::Certificate {
                    secret: OTHER,
                    signer: OTHER,
                },
            ),
        )
        .await;
        assert!(!served, "a third secret's key is refused");
        assert_eq!(
            handshake(
                &stranger,
                client_config(&stranger, Shows::Key(&old_accepting_new))
            )
            .await,
            (false, false)
        );
        // A lease signed with either secret's key is accepted; with the presented one signed.
        let keys: Vec<&[u8]> = new_accepting_old.lease_keys().collect();
        assert_eq!(keys[0], ReplicaKey::derive(NEW).unwrap().lease_key());
        assert_eq!(keys[1], ReplicaKey::derive(SECRET).unwrap().lease_key());
        assert!(!new_accepting_old.same_as(&ReplicaKey::derive(NEW).unwrap()));
    }
}
