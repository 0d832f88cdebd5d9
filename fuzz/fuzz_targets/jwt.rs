//! Token checking never panics on any input, and nothing the fuzzer makes is accepted:
//! without the private key (ES256) or the secret (HS256) no token can pass, whatever its
//! header claims (`alg: none`, another algorithm, a `kid` of its own).
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use fanout::config::{JwtConfig, JwtKeys};
use fanout::filters::auth::jwt::Jwt;
use jsonwebtoken::Algorithm;
use libfuzzer_sys::fuzz_target;

const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","alg":"ES256",
 "x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU",
 "y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn checkers() -> &'static [Jwt; 2] {
    static C: OnceLock<[Jwt; 2]> = OnceLock::new();
    C.get_or_init(|| {
        let config = |keys, algorithms| JwtConfig {
            keys,
            issuer: Some("https://idp.test".into()),
            audience: vec!["api".into()],
            algorithms,
            leeway: Duration::from_secs(30),
            claims_to_headers: vec![("sub".into(), http::HeaderName::from_static("x-user"))],
            header: None,
        };
        let set = fanout::config::jwks(JWKS).expect("jwks");
        let public = config(JwtKeys::Set(set), vec![Algorithm::ES256, Algorithm::RS256]);
        let secret = config(
            JwtKeys::Secret(b"a-secret-of-at-least-thirty-two-bytes".to_vec()),
            vec![Algorithm::HS256],
        );
        [
            Jwt::fixed(&public).expect("fixed keys"),
            Jwt::fixed(&secret).expect("fixed keys"),
        ]
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    for jwt in checkers() {
        assert!(rt.block_on(jwt.check(token)).is_err(), "accepted {token:?}");
    }
});
