//! The droplet id from DigitalOcean's metadata service
//! (`GET <metadata_url>/metadata/v1/id`), reported to the controller in the
//! Hello so that it matches this node to its droplet by id, never by name.
//!
//! Off unless `[digitalocean] metadata_url` is set in agent.toml (the
//! cloud-init user-data of `slipway-controller droplets create` sets it to
//! DigitalOcean's `http://169.254.169.254`); tests point it at a local
//! server. Plain HTTP, as the metadata service is, so only to the
//! link-local metadata address or a loopback address. The answer is checked:
//! at most [`MAX_BODY`] bytes, a decimal id from 1 to
//! [`slipway_proto::limits::MAX_DROPLET_ID`].

use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// DigitalOcean's metadata address.
pub const DIGITALOCEAN_METADATA: &str = "http://169.254.169.254";
/// Connecting and answering, each: the service is on the droplet's own link.
const TIMEOUT: Duration = Duration::from_secs(2);
/// An id is at most 16 digits; allow a newline and some slack.
const MAX_BODY: usize = 64;

/// Reads the droplet id. The error says what went wrong, for the log.
pub async fn droplet_id(url: &str) -> Result<u64, String> {
    let (host, port) = crate::config::check_metadata_url(url)?;
    let tcp = tokio::time::timeout(TIMEOUT, TcpStream::connect((host.as_str(), port)))
        .await
        .map_err(|_| format!("{url}: no connection within {TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let request = hyper::Request::get("/metadata/v1/id")
        .header(http::header::HOST, format!("{host}:{port}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("{url}: {e}"))?;
    let response = tokio::time::timeout(TIMEOUT, sender.send_request(request))
        .await
        .map_err(|_| format!("{url}: no answer within {TIMEOUT:?}"))?
        .map_err(|e| format!("{url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!(
            "{url}/metadata/v1/id answered {}",
            response.status()
        ));
    }
    let body = tokio::time::timeout(
        TIMEOUT,
        Limited::new(response.into_body(), MAX_BODY).collect(),
    )
    .await
    .map_err(|_| format!("{url}: body not read within {TIMEOUT:?}"))?
    .map_err(|e| format!("{url}/metadata/v1/id: body over {MAX_BODY} bytes or unreadable: {e}"))?
    .to_bytes();
    parse_id(&body).map_err(|e| format!("{url}/metadata/v1/id: {e}"))
}

fn parse_id(body: &[u8]) -> Result<u64, String> {
    let text = std::str::from_utf8(body)
        .map_err(|_| "not text".to_owned())?
        .trim();
    let id: u64 = text.parse().map_err(|_| {
        format!(
            "{:?} is not a droplet id",
            text.chars().take(32).collect::<String>()
        )
    })?;
    if id == 0 || id > slipway_proto::limits::MAX_DROPLET_ID {
        return Err(format!(
            "{id} is not a droplet id (1 to {})",
            slipway_proto::limits::MAX_DROPLET_ID
        ));
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_metadata_address_or_loopback() {
        use crate::config::check_metadata_url as check_url;
        assert_eq!(
            check_url(DIGITALOCEAN_METADATA).unwrap(),
            ("169.254.169.254".into(), 80)
        );
        assert_eq!(
            check_url("http://127.0.0.1:8181/").unwrap(),
            ("127.0.0.1".into(), 8181)
        );
        assert_eq!(check_url("http://[::1]:81").unwrap(), ("::1".into(), 81));
        for bad in [
            "https://169.254.169.254",
            "http://10.0.0.1",
            "http://example.com",
            "http://127.0.0.1/x",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_answer_is_checked() {
        assert_eq!(parse_id(b"3164444\n"), Ok(3_164_444));
        assert!(parse_id(b"0").is_err());
        assert!(parse_id(b"-1").is_err());
        assert!(parse_id(b"abc").is_err());
        assert!(parse_id(b"9007199254740992").is_err());
    }
}
