//! Deploys from GitHub Actions with no stored secret: the tests run their
//! own OIDC issuer (an RSA key pair made here with openssl, its JWKS on a
//! local HTTPS server whose certificate is made here too) and sign tokens
//! with GitHub's claim set; a local HTTPS server poses as the Actions
//! runtime (`ACTIONS_ID_TOKEN_REQUEST_URL`). A real controller with an
//! `[oidc]` grant checks them, on the gRPC API (the `slipway` CLI) and the
//! HTTP API, and a real agent runs the deploy.

// Helpers here panic on a failed setup step, like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::RsaKeyPair;
use serde_json::{json, Value};

use crate::deploy::HttpsFiles;
use crate::http::{get, upload, wait_done};
use crate::support::{
    artifact, bin, sha256_file, stderr, text, wait_until, Agent, Controller, APP,
};

/// The audience this controller expects (its URL, as the README advises).
const AUDIENCE: &str = "https://ctl.test";
/// The repository of the grant, by number and by name.
const REPO: &str = "octo-org/web";
const REPO_ID: &str = "74";
const OWNER_ID: &str = "65";
const WORKFLOW: &str = "octo-org/web/.github/workflows/deploy.yml@refs/heads/main";
/// The Actions runtime's credential for token requests.
const REQUEST_TOKEN: &str = "runner-request-secret";
/// `[oidc] key_refetch_interval` of the tests' controllers.
const REFETCH_SECS: u64 = 3;

/// The tests' token issuer: key pairs, and their public halves as a JWKS
/// on an HTTPS server.
struct Issuer {
    server: HttpsFiles,
    root: PathBuf,
    work: PathBuf,
}

/// An RSA key pair made by `openssl genpkey`, loaded into ring.
fn key_pair(work: &Path, name: &str) -> RsaKeyPair {
    let path = work.join(format!("{name}.p8"));
    let out = Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .args(["-outform", "DER", "-out"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl genpkey: {}", text(&out));
    // OpenSSL 3.0 writes a DER key as PKCS#1, later versions as PKCS#8.
    let der = fs::read(&path).unwrap();
    RsaKeyPair::from_pkcs8(&der)
        .or_else(|_| RsaKeyPair::from_der(&der))
        .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `header` and `claims` signed RS256 with `key`.
fn sign_with(header: &Value, claims: &Value, key: &RsaKeyPair) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut signature,
    )
    .unwrap();
    format!("{input}.{}", b64(&signature))
}

/// A token as GitHub signs it: header `typ`, `alg`, `x5t`, `kid`.
fn sign(kid: &str, key: &RsaKeyPair, claims: &Value) -> String {
    let header = json!({"typ": "JWT", "alg": "RS256", "x5t": kid, "kid": kid});
    sign_with(&header, claims, key)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// GitHub's claim set for a push to main of `octo-org/web`, deploying to
/// the `production` environment, issued by `iss` for `aud`; `changes`
/// replace claims (a `null` removes one).
fn claims(iss: &str, aud: &str, changes: &Value) -> Value {
    let now = now();
    let mut claims = json!({
        "jti": format!("jti-{now}-{}", rand_hex()),
        "sub": format!("repo:{REPO}:environment:production"),
        "environment": "production",
        "aud": aud,
        "ref": "refs/heads/main",
        "sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
        "repository": REPO,
        "repository_owner": "octo-org",
        "actor_id": "12",
        "repository_visibility": "private",
        "repository_id": REPO_ID,
        "repository_owner_id": OWNER_ID,
        "run_id": "5512345678",
        "run_number": "10",
        "run_attempt": "1",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "workflow": "deploy",
        "head_ref": "",
        "base_ref": "",
        "event_name": "push",
        "ref_type": "branch",
        "ref_protected": "true",
        "workflow_ref": WORKFLOW,
        "workflow_sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
        "job_workflow_ref": WORKFLOW,
        "job_workflow_sha": "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678",
        "iss": iss,
        "nbf": now - 5,
        "exp": now + 300,
        "iat": now - 5,
    });
    for (key, value) in changes.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(key);
        } else {
            claims[key] = value.clone();
        }
    }
    claims
}

fn rand_hex() -> String {
    let mut bytes = [0u8; 6];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).unwrap();
    hex::encode(bytes)
}

impl Issuer {
    fn start(work: &Path) -> Self {
        let work = work.join("issuer");
        let root = work.join("www");
        fs::create_dir_all(root.join(".well-known")).unwrap();
        let server = HttpsFiles::start(&work, &root);
        Self { server, root, work }
    }

    /// `https://127.0.0.1:PORT`, the `iss` of its tokens.
    fn url(&self) -> String {
        self.server.url("").trim_end_matches('/').to_owned()
    }

    fn ca_pem(&self) -> &Path {
        &self.server.ca_pem
    }

    /// Publishes `keys` (and only them) as `/.well-known/jwks`, replacing
    /// the file in one rename.
    fn publish(&self, keys: &[(&str, &RsaKeyPair)]) {
        let keys: Vec<Value> = keys
            .iter()
            .map(|(kid, key)| {
                let public: ring::rsa::PublicKeyComponents<Vec<u8>> = key.public().into();
                json!({
                    "kty": "RSA", "alg": "RS256", "use": "sig", "kid": kid,
                    "n": b64(&public.n), "e": b64(&public.e),
                    "x5t": kid,
                })
            })
            .collect();
        let temp = self.work.join("jwks.tmp");
        fs::write(&temp, json!({ "keys": keys }).to_string()).unwrap();
        fs::rename(&temp, self.root.join(".well-known/jwks")).unwrap();
    }

    /// How many times the JWKS was fetched.
    fn fetches(&self) -> usize {
        self.server.hits()
    }
}

/// Writes the controller config: the tests' issuer, this audience, one
/// grant for app `web` from `octo-org/web`'s main branch in `production`.
fn controller_config(work: &Path, issuer: &Issuer) -> PathBuf {
    let path = work.join("controller.toml");
    fs::write(
        &path,
        format!(
            r#"[oidc]
issuer = "{issuer}"
ca_file = "{ca}"
audience = "{AUDIENCE}"
leeway = "30s"
key_refetch_interval = "{REFETCH_SECS}s"

[[oidc.grant]]
app = "web"
repository_id = "{REPO_ID}"
repository_owner_id = {OWNER_ID}
ref = "refs/heads/main"
environment = "production"
job_workflow_ref = "{WORKFLOW}"
"#,
            issuer = issuer.url(),
            ca = issuer.ca_pem().display(),
        ),
    )
    .unwrap();
    path
}

/// The Actions runtime's token service: answers `GET <path>?…&audience=AUD`
/// carrying `Authorization: bearer <REQUEST_TOKEN>` with `{"value": …}`,
/// the token minted for AUD (a file named by AUD in hex); logs each request
/// as a JSON line (path, authorization); 401 for another credential.
const RUNTIME_SERVER: &str = r#"import http.server, json, os, ssl, sys, urllib.parse
tokens, cert, key, port_file, log, secret = sys.argv[1:7]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization")
        with open(log, "a") as f:
            f.write(json.dumps({"path": self.path, "authorization": auth, "accept": self.headers.get("Accept")}) + "\n")
        if auth != "bearer " + secret:
            return self.answer(401, {"message": "Bad credentials"})
        query = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
        audience = query.get("audience", [""])[0]
        path = os.path.join(tokens, audience.encode().hex())
        if not audience or not os.path.exists(path):
            return self.answer(400, {"message": "no token for that audience"})
        with open(path) as f:
            self.answer(200, {"count": 1, "value": f.read()})
    def answer(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def log_message(self, *a):
        pass
httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
with open(port_file + ".tmp", "w") as f:
    f.write(str(httpd.server_address[1]))
os.rename(port_file + ".tmp", port_file)
httpd.serve_forever()
"#;

/// The local Actions runtime (see [`RUNTIME_SERVER`]).
struct Runtime {
    child: std::process::Child,
    port: u16,
    tokens: PathBuf,
    log: PathBuf,
    ca_pem: PathBuf,
}

impl Runtime {
    fn start(work: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer as CertIssuer, KeyPair};
        let work = work.join("runtime");
        let tokens = work.join("tokens");
        fs::create_dir_all(&tokens).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Actions runtime test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&key, &CertIssuer::from_params(&ca_params, &ca_key))
            .unwrap();
        let ca_pem = work.join("runtime-ca.pem");
        fs::write(&ca_pem, ca_cert.pem()).unwrap();
        fs::write(work.join("cert.pem"), cert.pem()).unwrap();
        fs::write(work.join("key.pem"), key.serialize_pem()).unwrap();
        fs::write(work.join("runtime.py"), RUNTIME_SERVER).unwrap();
        let port_file = work.join("port");
        let log = work.join("requests.jsonl");
        let child = Command::new("python3")
            .arg(work.join("runtime.py"))
            .arg(&tokens)
            .arg(work.join("cert.pem"))
            .arg(work.join("key.pem"))
            .arg(&port_file)
            .arg(&log)
            .arg(REQUEST_TOKEN)
            .spawn()
            .unwrap();
        wait_until("the Actions runtime", Duration::from_secs(20), || {
            port_file.exists()
        });
        let port = fs::read_to_string(&port_file).unwrap().parse().unwrap();
        Self {
            child,
            port,
            tokens,
            log,
            ca_pem,
        }
    }

    /// The runtime will answer `token` to a request for `audience`.
    fn mint(&self, audience: &str, token: &str) {
        fs::write(self.tokens.join(hex::encode(audience)), token).unwrap();
    }

    /// `ACTIONS_ID_TOKEN_REQUEST_URL` as a runner sets it (with a query).
    fn request_url(&self) -> String {
        format!(
            "https://127.0.0.1:{}/_apis/actions/oidc/token?api-version=2.0",
            self.port
        )
    }

    fn requests(&self) -> Vec<Value> {
        fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// `slipway` with the controller's address and CA, in a job's
    /// environment: the runtime's variables, its CA trusted through
    /// SSL_CERT_FILE, and no API token.
    fn slipway(&self, controller: &Controller, request_token: &str, args: &[&str]) -> Output {
        controller
            .slipway_command()
            .args(args)
            .env("ACTIONS_ID_TOKEN_REQUEST_URL", self.request_url())
            .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", request_token)
            .env("SSL_CERT_FILE", &self.ca_pem)
            .env_remove("SLIPWAY_TOKEN")
            .env_remove("SLIPWAY_OIDC")
            .env_remove("SLIPWAY_OIDC_AUDIENCE")
            .output()
            .unwrap()
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The audit events of `kind`, newest first.
fn events(controller: &Controller, reader: &str, kind: &str) -> Vec<Value> {
    controller
        .audit(reader)
        .into_iter()
        .filter(|e| e["event_type"] == kind)
        .collect()
}

#[test]
fn github_actions_oidc_token_deploys_through_the_cli_and_the_http_api() {
    let work = tempfile::tempdir().unwrap();
    let issuer = Issuer::start(work.path());
    let key = key_pair(work.path(), "k1");
    issuer.publish(&[("k1", &key)]);
    let config = controller_config(work.path(), &issuer);
    let controller = Controller::start_http_with(&["--config", config.to_str().unwrap()]);
    let mut agent = Agent::enroll(&controller, "o1");
    agent.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let runtime = Runtime::start(work.path());
    runtime.mint(
        AUDIENCE,
        &sign("k1", &key, &claims(&issuer.url(), AUDIENCE, &json!({}))),
    );

    // In a job with the runtime's variables and no token, `slipway`
    // fetches a token by itself and deploys with it.
    let v1 = artifact(work.path(), "v1", APP);
    let sha1 = sha256_file(&v1);
    let out = runtime.slipway(
        &controller,
        REQUEST_TOKEN,
        &[
            "--oidc-audience",
            AUDIENCE,
            "deploy",
            "web",
            v1.to_str().unwrap(),
            "--sha",
            &sha1,
            "--id",
            "v1",
            "--wait",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", text(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["succeeded"], true, "{result}");
    assert_eq!(agent.current().as_deref(), Some("v1"));
    // It asked exactly as the Actions toolkit does: the runner's URL with
    // `&audience=` added, `Authorization: bearer <request token>`.
    let requests = runtime.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(
        requests[0]["path"],
        "/_apis/actions/oidc/token?api-version=2.0&audience=https%3A%2F%2Fctl.test"
    );
    assert_eq!(
        requests[0]["authorization"],
        format!("bearer {REQUEST_TOKEN}").as_str()
    );
    assert_eq!(issuer.fetches(), 1, "the keys were fetched once and cached");

    // Audited: the token accepted with the claims that decided, and the
    // deploy by the repository's run.
    let accepted = events(&controller, &reader, "OIDC_TOKEN_ACCEPTED");
    assert!(!accepted.is_empty());
    let actor = format!("oidc:{REPO}:run/5512345678");
    for e in &accepted {
        assert_eq!(e["actor"], actor.as_str(), "{e}");
        assert_eq!(e["details"]["claims"]["repository_id"], REPO_ID, "{e}");
        assert_eq!(e["details"]["claims"]["ref"], "refs/heads/main", "{e}");
        assert_eq!(e["details"]["claims"]["environment"], "production", "{e}");
        assert_eq!(e["details"]["scopes"], "deploy:web", "{e}");
    }
    let started = events(&controller, &reader, "DEPLOY_STARTED");
    assert_eq!(started[0]["actor"], actor.as_str(), "{started:?}");

    // --oidc with an audience this controller does not expect: the
    // runtime gives a token for it, the controller refuses it by name.
    runtime.mint(
        "other",
        &sign("k1", &key, &claims(&issuer.url(), "other", &json!({}))),
    );
    let out = runtime.slipway(
        &controller,
        REQUEST_TOKEN,
        &["--oidc", "--oidc-audience", "other", "nodes"],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out)
            .contains(r#"audience "other" refused: this controller expects "https://ctl.test""#),
        "{}",
        text(&out)
    );
    // A runtime that refuses the request token: the error says so.
    let out = runtime.slipway(
        &controller,
        "wrong",
        &["--oidc-audience", AUDIENCE, "nodes"],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(stderr(&out).contains("HTTP 401"), "{}", text(&out));
    assert!(stderr(&out).contains("id-token: write"), "{}", text(&out));
    // --oidc outside a job: a usage error.
    let out = controller
        .slipway_command()
        .args(["--oidc", "nodes"])
        .env_remove("ACTIONS_ID_TOKEN_REQUEST_URL")
        .env_remove("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
        .env_remove("SLIPWAY_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr(&out).contains("ACTIONS_ID_TOKEN_REQUEST_URL"),
        "{}",
        text(&out)
    );

    // The HTTP API takes the same token as `Authorization: Bearer`.
    let jwt = sign("k1", &key, &claims(&issuer.url(), AUDIENCE, &json!({})));
    let v2 = artifact(work.path(), "v2", APP);
    let (code, body) = upload(&controller, &jwt, &v2);
    assert_eq!(code, 201, "{body}");
    let (code, body) = crate::http::post(
        &controller,
        &jwt,
        "/api/v1/apps/web/deploy",
        &format!(r#"{{"sha256":"{}","release_id":"v2"}}"#, sha256_file(&v2)),
    );
    assert_eq!(code, 202, "{body}");
    let id = body["deployment_id"].as_str().unwrap().to_owned();
    let done = wait_done(&controller, &jwt, &id);
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(agent.current().as_deref(), Some("v2"));
    // Its scopes are the grant's: no other app.
    let (code, body) = crate::http::post(
        &controller,
        &jwt,
        "/api/v1/apps/api/deploy",
        &format!(r#"{{"sha256":"{}"}}"#, sha256_file(&v2)),
    );
    assert_eq!(code, 403, "{body}");
    // Another branch: 403 naming the claim; expired: 401.
    let feature = sign(
        "k1",
        &key,
        &claims(
            &issuer.url(),
            AUDIENCE,
            &json!({"ref": "refs/heads/feature"}),
        ),
    );
    let (code, body) = get(&controller, &feature, "/api/v1/nodes");
    assert_eq!(code, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains(
            r#"grant[0] (app web): ref is "refs/heads/feature", the grant wants "refs/heads/main""#
        ),
        "{body}"
    );
    let expired = sign(
        "k1",
        &key,
        &claims(
            &issuer.url(),
            AUDIENCE,
            &json!({"iat": now() - 900, "nbf": now() - 900, "exp": now() - 300}),
        ),
    );
    let (code, body) = get(&controller, &expired, "/api/v1/nodes");
    assert_eq!(code, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );
}

/// `slipway --token TOKEN nodes` (a JWT goes to the OIDC verifier).
fn nodes_with(controller: &Controller, token: &str) -> Output {
    controller.slipway(token, &["nodes", "--json"])
}

fn refused_with(controller: &Controller, token: &str, want: &str) {
    let out = nodes_with(controller, token);
    assert!(!out.status.success(), "accepted, wanted {want:?}");
    assert!(
        stderr(&out).contains(want),
        "wanted {want:?}: {}",
        text(&out)
    );
}

#[test]
fn oidc_tokens_are_refused_naming_what_is_wrong_and_keys_are_refetched_at_a_limited_rate() {
    let work = tempfile::tempdir().unwrap();
    let issuer = Issuer::start(work.path());
    let k1 = key_pair(work.path(), "k1");
    let k2 = key_pair(work.path(), "k2");
    issuer.publish(&[("k1", &k1)]);
    let config = controller_config(work.path(), &issuer);
    let controller = Controller::start_with(&["--config", config.to_str().unwrap()]);
    let reader = controller.api_token("read");
    let iss = issuer.url();
    let token = |changes: Value| sign("k1", &k1, &claims(&iss, AUDIENCE, &changes));

    let good = token(json!({}));
    let out = nodes_with(&controller, &good);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(issuer.fetches(), 1);

    refused_with(
        &controller,
        &token(json!({"aud": "https://other.test"})),
        r#"OIDC token for audience "https://other.test" refused"#,
    );
    refused_with(
        &controller,
        &token(json!({"iat": now() - 900, "nbf": now() - 900, "exp": now() - 300})),
        "OIDC token expired 30",
    );
    refused_with(
        &controller,
        &token(json!({"nbf": now() + 600})),
        "OIDC token not valid for another",
    );
    // The same name, another repository: deleted and re-created, or a
    // rename taken over. The number decides.
    refused_with(
        &controller,
        &token(
            json!({"repository_id": "999", "sub": format!("repo:{REPO}:environment:production")}),
        ),
        r#"OIDC token of oidc:octo-org/web matches no [[oidc.grant]]: grant[0] (app web): repository_id is "999", the grant wants "74""#,
    );
    refused_with(
        &controller,
        &token(
            json!({"ref": "refs/heads/feature", "sub": format!("repo:{REPO}:ref:refs/heads/feature")}),
        ),
        r#"ref is "refs/heads/feature", the grant wants "refs/heads/main""#,
    );
    refused_with(
        &controller,
        &token(json!({"environment": null})),
        r#"environment is absent, the grant wants "production""#,
    );
    refused_with(
        &controller,
        &token(json!({"iss": "https://token.actions.githubusercontent.com"})),
        r#"OIDC token from issuer "https://token.actions.githubusercontent.com" refused"#,
    );
    // Tampered: the claims of another branch's token under main's signature.
    let other = token(json!({"ref": "refs/heads/feature"}));
    let other_parts: Vec<&str> = other.split('.').collect();
    let good_parts: Vec<&str> = good.split('.').collect();
    let tampered = format!("{}.{}.{}", good_parts[0], other_parts[1], good_parts[2]);
    refused_with(
        &controller,
        &tampered,
        r#"OIDC token signature does not verify with the issuer's key "k1""#,
    );
    let mut flipped = good.clone().into_bytes();
    let last = flipped.len() - 2;
    flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
    refused_with(
        &controller,
        &String::from_utf8(flipped).unwrap(),
        "signature does not verify",
    );
    // alg none, with no signature at all; HS256 keyed with the public key.
    let claims_b64 = good_parts[1];
    let none = format!(
        "{}.{claims_b64}.",
        b64(json!({"alg": "none", "kid": "k1", "typ": "JWT"})
            .to_string()
            .as_bytes())
    );
    refused_with(
        &controller,
        &none,
        r#"OIDC token signed with "none" refused: only RS256 is accepted"#,
    );
    let hs_header = b64(json!({"alg": "HS256", "kid": "k1", "typ": "JWT"})
        .to_string()
        .as_bytes());
    let hs_input = format!("{hs_header}.{claims_b64}");
    let public = fs::read(issuer.root.join(".well-known/jwks")).unwrap();
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &public),
        hs_input.as_bytes(),
    );
    refused_with(
        &controller,
        &format!("{hs_input}.{}", b64(mac.as_ref())),
        r#"OIDC token signed with "HS256" refused"#,
    );
    // Too long to look at.
    let long = token(json!({"padding": "x".repeat(9000)}));
    refused_with(&controller, &long, "refused: the limit is 8192");
    // None of these needed the keys again.
    assert_eq!(issuer.fetches(), 1);

    // Every decision is audited; a refusal after the signature checked
    // carries the claims that decided it.
    let refused = events(&controller, &reader, "OIDC_TOKEN_REFUSED");
    let by_number = refused
        .iter()
        .find(|e| {
            e["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("repository_id is \"999\""))
        })
        .unwrap_or_else(|| panic!("{refused:?}"));
    assert_eq!(by_number["actor"], "oidc:octo-org/web");
    assert_eq!(by_number["details"]["claims"]["repository"], REPO);
    assert_eq!(by_number["details"]["claims"]["repository_id"], "999");
    let unsigned = refused
        .iter()
        .find(|e| {
            e["error_message"]
                .as_str()
                .is_some_and(|m| m.contains("\"none\""))
        })
        .unwrap();
    assert!(unsigned["details"]["claims"].is_null(), "{unsigned}");
    assert_eq!(events(&controller, &reader, "OIDC_TOKEN_ACCEPTED").len(), 1);

    // The issuer rotates to k2 but has not published it yet: a token with
    // kid k2 makes the controller fetch the keys once, then refuse; a flood
    // of made-up kids right after costs the issuer nothing more until the
    // refetch interval has passed.
    std::thread::sleep(Duration::from_secs(REFETCH_SECS));
    let k2_token = sign("k2", &k2, &claims(&iss, AUDIENCE, &json!({})));
    let flood_start = Instant::now();
    refused_with(&controller, &k2_token, r#"unknown key "k2""#);
    assert_eq!(issuer.fetches(), 2);
    for i in 0..10 {
        let made_up = sign(
            &format!("bogus-{i}"),
            &k2,
            &claims(&iss, AUDIENCE, &json!({})),
        );
        refused_with(&controller, &made_up, "unknown key");
    }
    let elapsed = flood_start.elapsed().as_secs();
    let allowed = 2 + usize::try_from(elapsed / REFETCH_SECS).unwrap();
    assert!(
        issuer.fetches() <= allowed,
        "{} fetches in {elapsed}s of flood",
        issuer.fetches()
    );
    // Now k2 is published (and k1 withdrawn): after the interval, the
    // next k2 token refetches and is accepted.
    issuer.publish(&[("k2", &k2)]);
    std::thread::sleep(Duration::from_secs(REFETCH_SECS));
    let before = issuer.fetches();
    let out = nodes_with(&controller, &k2_token);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(issuer.fetches(), before + 1);
    // k1 is gone from the key set: its tokens no longer verify.
    refused_with(&controller, &token(json!({})), r#"unknown key "k1""#);
}

#[test]
fn a_bad_oidc_section_stops_the_controller_naming_the_file_and_key() {
    let work = tempfile::tempdir().unwrap();
    let config = work.path().join("bad.toml");
    for (body, key) in [
        (
            "[oidc]\n[[oidc.grant]]\napp = \"web\"\nrepository_id = \"octo-org/web\"\n",
            "oidc.grant[0].repository_id",
        ),
        (
            "[oidc]\n[[oidc.grant]]\napp = \"web\"\nref = \"refs/heads/main\"\n",
            "needs repository_id or repository_owner_id",
        ),
        (
            "[oidc]\nca_file = \"/nonexistent/ca.pem\"\n[[oidc.grant]]\napp = \"web\"\nrepository_id = 1\n",
            "oidc.ca_file",
        ),
    ] {
        fs::write(&config, body).unwrap();
        let out = Command::new(bin("slipway-controller"))
            .args(["serve", "--data-dir"])
            .arg(work.path().join("data"))
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{}", text(&out));
        let err = stderr(&out);
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains(key), "{key}: {err}");
    }
}

/// The action's steps (`packaging/github/*.sh`) as a runner runs them: the
/// inputs in the environment action.yml maps them to, `GITHUB_OUTPUT`,
/// `GITHUB_STEP_SUMMARY`, `GITHUB_PATH`, and the Actions runtime.
fn action_step(runtime: &Runtime, work: &Path, script: &str, env: &[(&str, &str)]) -> Output {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin("slipway").parent().unwrap().display(),
        std::env::var("PATH").unwrap()
    );
    Command::new("bash")
        .arg(repo.join("packaging/github").join(script))
        .env("PATH", path)
        .env("GITHUB_ACTION_PATH", repo)
        .env("GITHUB_OUTPUT", work.join("output"))
        .env("GITHUB_STEP_SUMMARY", work.join("summary.md"))
        .env("GITHUB_PATH", work.join("path"))
        .env("RUNNER_TEMP", work)
        .env("ACTIONS_ID_TOKEN_REQUEST_URL", runtime.request_url())
        .env("ACTIONS_ID_TOKEN_REQUEST_TOKEN", REQUEST_TOKEN)
        .env("SSL_CERT_FILE", &runtime.ca_pem)
        .env_remove("SLIPWAY_TOKEN")
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `key=value` lines of a GITHUB_OUTPUT file.
fn outputs(work: &Path) -> std::collections::HashMap<String, String> {
    fs::read_to_string(work.join("output"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

#[test]
fn the_github_action_installs_the_cli_deploys_with_the_jobs_token_and_reports() {
    let work = tempfile::tempdir().unwrap();
    let issuer = Issuer::start(work.path());
    let key = key_pair(work.path(), "k1");
    issuer.publish(&[("k1", &key)]);
    let config = controller_config(work.path(), &issuer);
    let controller = Controller::start_with(&["--config", config.to_str().unwrap()]);
    let mut agent = Agent::enroll(&controller, "a1");
    agent.run();
    let reader = controller.api_token("read");
    controller.wait_online(&reader, 1, Duration::from_secs(30));
    let runtime = Runtime::start(work.path());
    runtime.mint(
        AUDIENCE,
        &sign("k1", &key, &claims(&issuer.url(), AUDIENCE, &json!({}))),
    );
    let ca = fs::read_to_string(controller.ca_pem()).unwrap();

    // Step 1, from a URL: downloaded over https, its sha256 checked, put
    // on GITHUB_PATH; a wrong sha256 installs nothing.
    let files = work.path().join("files");
    fs::create_dir_all(&files).unwrap();
    fs::copy(bin("slipway"), files.join("slipway-0.1.0")).unwrap();
    let cli_sha = sha256_file(&files.join("slipway-0.1.0"));
    let server = HttpsFiles::start(work.path(), &files);
    let url = server.url("slipway-{version}");
    let step = work.path().join("install");
    fs::create_dir_all(&step).unwrap();
    let install = |sha: &str| {
        action_step(
            &runtime,
            &step,
            "install-cli.sh",
            &[
                ("SLIPWAY_CLI_URL", url.as_str()),
                ("SLIPWAY_CLI_VERSION", "0.1.0"),
                ("SLIPWAY_CLI_SHA256", sha),
                ("CURL_CA_BUNDLE", server.ca_pem.to_str().unwrap()),
            ],
        )
    };
    let out = install(&"0".repeat(64));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("cli-sha256 says"), "{}", text(&out));
    assert!(!step.join("path").exists());
    let out = install(&cli_sha);
    assert!(out.status.success(), "{}", text(&out));
    let added = fs::read_to_string(step.join("path")).unwrap();
    assert!(Path::new(added.trim()).join("slipway").exists(), "{added}");

    // Step 2: deploy with the job's token; outputs and a summary.
    let art = artifact(work.path(), "v1", APP);
    let deploy = |app: &str| {
        let dir = work.path().join(format!("deploy-{app}"));
        fs::create_dir_all(&dir).unwrap();
        let out = action_step(
            &runtime,
            &dir,
            "deploy.sh",
            &[
                ("SLIPWAY_CONTROLLER", controller.url().as_str()),
                ("SLIPWAY_CA_PEM", ca.as_str()),
                ("SLIPWAY_OIDC_AUDIENCE", AUDIENCE),
                ("DEPLOY_APP", app),
                ("DEPLOY_ARTIFACT", art.to_str().unwrap()),
                ("DEPLOY_RELEASE_ID", "v1"),
                ("DEPLOY_GIT_SHA", "a1b2c3d4e5f60718293a4b5c6d7e8f9012345678"),
                ("DEPLOY_STRATEGY", "rolling"),
                ("DEPLOY_MAX_PARALLEL", "1"),
                ("DEPLOY_MAX_UNAVAILABLE", ""),
                ("DEPLOY_CANARY", ""),
                ("DEPLOY_TAG", ""),
                ("DEPLOY_NODE", ""),
                // A stored token in the environment is not used.
                ("SLIPWAY_TOKEN", "slwa1.0000000000000000.stale"),
            ],
        );
        let summary = fs::read_to_string(dir.join("summary.md")).unwrap_or_default();
        (out, outputs(&dir), summary)
    };
    let (out, outs, summary) = deploy("web");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(outs["result"], "succeeded", "{outs:?}");
    assert_eq!(outs["release-id"], "v1");
    assert!(outs["deployment-id"].starts_with("d-"), "{outs:?}");
    assert!(
        summary.contains("### Slipway deploy of `web`: succeeded"),
        "{summary}"
    );
    assert!(summary.contains("| a1 | succeeded | v1 |"), "{summary}");
    assert_eq!(agent.current().as_deref(), Some("v1"));
    // An app the grant does not cover: the step fails, the summary says why.
    let (out, outs, summary) = deploy("api");
    assert!(!out.status.success());
    assert_eq!(outs["result"], "error", "{outs:?}");
    assert_eq!(outs["deployment-id"], "");
    assert!(summary.contains("may not"), "{summary}");
}
