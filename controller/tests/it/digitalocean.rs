//! Contract tests of the DigitalOcean client (issue 14) against a local API
//! that validates every request and answer against the official
//! description (support::do_api). Each test ends by asserting that the
//! server saw nothing the description does not allow.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use serde_json::json;
use slipway_controller::digitalocean::api::MAX_USER_DATA;
use slipway_controller::digitalocean::{
    Client, DoError, Endpoints, Firewall, FirewallRule, NewDroplet, NewRecord, RetryPolicy,
    Settings, Token,
};

use crate::support::do_api::{DoApi, DO_TOKEN};

/// Quick retries: the waits the policy allows, in milliseconds.
fn quick() -> RetryPolicy {
    RetryPolicy {
        max_retries: 4,
        min_wait: Duration::from_millis(10),
        max_wait: Duration::from_millis(1500),
    }
}

fn client(api: &DoApi, page_size: u32) -> Client {
    Client::new(Settings {
        api_url: api.base.clone(),
        token: Token::new(DO_TOKEN).unwrap(),
        retry: quick(),
        timeout: Duration::from_secs(20),
        page_size,
    })
    .unwrap()
}

fn api_requests(log: &[serde_json::Value], path: &str) -> Vec<serde_json::Value> {
    log.iter().filter(|e| e["path"] == path).cloned().collect()
}

#[tokio::test]
async fn droplets_by_tag_follow_every_page() {
    let api = DoApi::start().await;
    let mut want = Vec::new();
    for i in 0..23 {
        let d = api
            .seed_droplet(&format!("web-{i}"), &["env:production", "product:shop"])
            .await;
        want.push(d["id"].as_u64().unwrap());
        api.seed_droplet(&format!("other-{i}"), &["env:staging"])
            .await;
    }
    let client = client(&api, 5);
    let droplets = client.droplets_by_tag("env:production").await.unwrap();
    let got: Vec<u64> = droplets.iter().map(|d| d.id).collect();
    assert_eq!(got, want, "every tagged droplet, in order, once");
    let first = &droplets[0];
    assert_eq!(first.name, "web-0");
    assert_eq!(first.tags, ["env:production", "product:shop"]);
    assert!(first
        .public_ipv4()
        .unwrap()
        .to_string()
        .starts_with("203.0.113."));
    assert!(first
        .private_ipv4()
        .unwrap()
        .to_string()
        .starts_with("10.110.0."));
    assert_eq!(first.region.slug, "fra1");
    let log = api.log().await;
    let pages: Vec<String> = api_requests(&log, "/v2/droplets")
        .iter()
        .map(|e| e["query"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(pages.len(), 5, "23 droplets in pages of 5: {pages:?}");
    assert!(pages[0].contains("tag_name=env%3Aproduction"), "{pages:?}");
    assert!(pages[4].contains("page=5"), "{pages:?}");
    assert!(log.iter().all(|e| e["authorization_ok"] == true));
    let rate = client.rate_limit().expect("rate-limit headers read");
    assert_eq!(rate.limit, 5000);
    assert!(rate.remaining < 5000);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_429_with_retry_after_is_waited_out() {
    let api = DoApi::start().await;
    api.seed_droplet("web-1", &["env:production"]).await;
    api.faults(
        json!([{ "method": "GET", "path_prefix": "/v2/droplets", "status": 429,
                        "retry_after": 1, "count": 1 }]),
    )
    .await;
    let started = Instant::now();
    let droplets = client(&api, 200)
        .droplets_by_tag("env:production")
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(droplets.len(), 1);
    assert!(
        took >= Duration::from_secs(1),
        "retry-after: 1 was not waited for ({took:?})"
    );
    let statuses: Vec<u64> = api_requests(&api.log().await, "/v2/droplets")
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [429, 200]);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_429_with_no_quota_left_waits_for_the_reset_within_the_bound() {
    let api = DoApi::start().await;
    api.seed_droplet("web-1", &["env:production"]).await;
    // No retry-after, ratelimit-remaining 0, reset 60 s ahead: the wait is
    // the time to the reset, clamped to the policy's longest (1.5 s).
    api.faults(
        json!([{ "path_prefix": "/v2/droplets", "status": 429, "count": 1,
                        "ratelimit_remaining": 0 }]),
    )
    .await;
    let started = Instant::now();
    client(&api, 200)
        .droplets_by_tag("env:production")
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(1400), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
    api.assert_no_violations().await;
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let api = DoApi::start().await;
    let d = api.seed_droplet("web-1", &["env:production"]).await;
    let id = d["id"].as_u64().unwrap();
    api.faults(json!([{ "path_prefix": format!("/v2/droplets/{id}"), "status": 500, "count": 2 }]))
        .await;
    let droplet = client(&api, 200).droplet(id).await.unwrap();
    assert_eq!(droplet.name, "web-1");
    let statuses: Vec<u64> = api_requests(&api.log().await, &format!("/v2/droplets/{id}"))
        .iter()
        .map(|e| e["status"].as_u64().unwrap())
        .collect();
    assert_eq!(statuses, [500, 500, 200]);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn retries_stop_after_four_and_the_error_carries_do_fields() {
    let api = DoApi::start().await;
    api.faults(
        json!([{ "path_prefix": "/v2/droplets", "status": 503, "count": 50,
                        "id": "service_unavailable", "message": "try later" }]),
    )
    .await;
    let err = client(&api, 200)
        .droplets_by_tag("env:production")
        .await
        .unwrap_err();
    let DoError::GaveUp { attempts, last } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*attempts, 5, "1 attempt + 4 retries");
    let DoError::Api {
        status,
        id,
        message,
        request_id,
        ..
    } = &**last
    else {
        panic!("{last:?}")
    };
    assert_eq!(
        (status.as_u16(), id.as_str(), message.as_str()),
        (503, "service_unavailable", "try later")
    );
    assert!(
        request_id.as_deref().is_some_and(|r| r.len() == 36),
        "{request_id:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("service_unavailable") && text.contains("request_id"),
        "{text}"
    );
    assert_eq!(api_requests(&api.log().await, "/v2/droplets").len(), 5);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn errors_that_retrying_cannot_fix_are_not_retried() {
    let api = DoApi::start().await;
    let err = client(&api, 200).droplet(424242).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    let DoError::Api {
        id,
        message,
        request_id,
        ..
    } = &err
    else {
        panic!("{err:?}")
    };
    assert_eq!(id, "not_found");
    assert!(message.contains("could not be found"), "{message}");
    assert!(request_id.is_some());
    assert_eq!(
        api_requests(&api.log().await, "/v2/droplets/424242").len(),
        1
    );

    // A wrong token: 401 unauthorized, and the token is in no message.
    let wrong = Client::new(Settings {
        api_url: api.base.clone(),
        token: Token::new("dop_v1_wrong_secret").unwrap(),
        retry: quick(),
        timeout: Duration::from_secs(20),
        page_size: 200,
    })
    .unwrap();
    let err = wrong.droplets_by_tag("env:production").await.unwrap_err();
    assert_eq!(err.status().map(|s| s.as_u16()), Some(401), "{err}");
    assert!(err.to_string().contains("unauthorized"), "{err}");
    assert!(!format!("{err} {err:?} {wrong:?}").contains("wrong_secret"));
    api.assert_no_violations().await;
}

#[tokio::test]
async fn a_next_page_link_to_another_host_is_refused() {
    let api = DoApi::start().await;
    for i in 0..3 {
        api.seed_droplet(&format!("web-{i}"), &["env:production"])
            .await;
    }
    api.control(
        "POST",
        "/_test/config",
        Some(json!({ "link_base": "http://127.0.0.2:9" })),
    )
    .await;
    let err = client(&api, 2)
        .droplets_by_tag("env:production")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("leaves the API"), "{err}");
    // The token went nowhere else: one request, to the server itself.
    assert_eq!(api_requests(&api.log().await, "/v2/droplets").len(), 1);
    api.assert_no_violations().await;
}

#[tokio::test]
async fn droplets_actions_records_firewalls_and_tags_follow_the_description() {
    let api = DoApi::start().await;
    let client = client(&api, 200);

    // Create with tags and user-data, then read it back.
    let new = NewDroplet {
        name: "web-4".into(),
        region: "fra1".into(),
        size: "s-1vcpu-1gb".into(),
        image: "debian-12-x64".into(),
        ssh_keys: vec!["3b:16:bf:e4:8b:00:8b:b8:59:8c:a9:d3:f0:19:45:fa".into()],
        tags: vec!["env:production".into()],
        user_data: Some("#cloud-config\nruncmd: [\"true\"]\n".into()),
    };
    let created = client.create_droplet(&new).await.unwrap();
    assert_eq!(
        (created.name.as_str(), created.status.as_str()),
        ("web-4", "new")
    );
    let stored = api
        .control(
            "GET",
            &format!("/_test/droplets/{}/user_data", created.id),
            None,
        )
        .await;
    assert_eq!(stored["user_data"], new.user_data.clone().unwrap());
    assert_eq!(
        client.droplet(created.id).await.unwrap().tags,
        ["env:production"]
    );

    // Too much user-data never leaves the controller.
    let big = NewDroplet {
        user_data: Some("x".repeat(MAX_USER_DATA + 1)),
        ..new.clone()
    };
    assert!(client
        .create_droplet(&big)
        .await
        .unwrap_err()
        .to_string()
        .contains("user_data"));

    // A snapshot, polled until done; a power cycle.
    api.control(
        "POST",
        "/_test/config",
        Some(json!({ "polls_to_complete": 3 })),
    )
    .await;
    let snap = client
        .snapshot(created.id, "web-4-before-deploy")
        .await
        .unwrap();
    assert_eq!(
        (snap.kind.as_str(), snap.status.as_str()),
        ("snapshot", "in-progress")
    );
    let done = client
        .wait_action(
            snap.id,
            Duration::from_millis(20),
            Instant::now() + Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(done.status, "completed");
    assert_eq!(done.resource_id, Some(created.id));
    assert_eq!(
        api_requests(&api.log().await, &format!("/v2/actions/{}", snap.id)).len(),
        3
    );
    let cycle = client.power_cycle(created.id).await.unwrap();
    assert_eq!(cycle.kind, "power_cycle");
    let err = client
        .wait_action(cycle.id, Duration::from_millis(20), Instant::now())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DoError::Timeout { .. }),
        "a deadline already past: {err}"
    );

    // Domain records: create, filter by type and full name, update, delete.
    api.control(
        "POST",
        "/_test/domains",
        Some(json!({ "name": "example.com" })),
    )
    .await;
    let record = NewRecord {
        kind: "A".into(),
        name: "app".into(),
        data: "203.0.113.7".into(),
        ttl: 60,
    };
    let made = client.create_record("example.com", &record).await.unwrap();
    client
        .create_record(
            "example.com",
            &NewRecord {
                name: "www".into(),
                ..record.clone()
            },
        )
        .await
        .unwrap();
    let found = client
        .records("example.com", "A", "app.example.com")
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].id, found[0].data.as_str(), found[0].ttl),
        (made.id, "203.0.113.7", Some(60))
    );
    let changed = client
        .update_record(
            "example.com",
            made.id,
            &NewRecord {
                data: "203.0.113.8".into(),
                ..record.clone()
            },
        )
        .await
        .unwrap();
    assert_eq!(changed.data, "203.0.113.8");
    client.delete_record("example.com", made.id).await.unwrap();
    assert!(client
        .records("example.com", "A", "app.example.com")
        .await
        .unwrap()
        .is_empty());
    let err = client
        .records("no-such.example", "A", "x.no-such.example")
        .await
        .unwrap_err();
    assert!(err.is_not_found(), "{err}");

    // Firewalls: create, list, replace.
    let mut firewall = Firewall {
        id: String::new(),
        name: "slipway-fleet".into(),
        inbound_rules: vec![FirewallRule {
            protocol: "tcp".into(),
            ports: "22".into(),
            sources: Endpoints {
                addresses: vec!["192.0.2.0/24".into()],
                ..Endpoints::default()
            },
        }],
        outbound_rules: vec![],
        droplet_ids: vec![],
        tags: vec!["env:production".into()],
    };
    let made = client.create_firewall(&firewall).await.unwrap();
    assert!(!made.id.is_empty());
    let all = client.firewalls().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].inbound_rules, firewall.inbound_rules);
    firewall.inbound_rules.push(FirewallRule {
        protocol: "tcp".into(),
        ports: "443".into(),
        sources: Endpoints {
            addresses: vec!["0.0.0.0/0".into(), "::/0".into()],
            ..Endpoints::default()
        },
    });
    let updated = client.update_firewall(&made.id, &firewall).await.unwrap();
    assert_eq!(updated.inbound_rules.len(), 2);
    assert_eq!(updated.tags, ["env:production"]);

    // Tags.
    assert!(!client.tag_exists("product:new").await.unwrap());
    client.create_tag("product:new").await.unwrap();
    assert!(client.tag_exists("product:new").await.unwrap());

    // Destroy: gone afterwards.
    client.destroy_droplet(created.id).await.unwrap();
    assert!(client.droplet(created.id).await.unwrap_err().is_not_found());

    api.assert_no_violations().await;
}

/// The contract server is not a rubber stamp: requests the description
/// forbids are refused and recorded, which is what fails the other tests.
#[tokio::test]
async fn the_local_api_refuses_what_the_description_forbids() {
    let api = DoApi::start().await;
    let d = api.seed_droplet("web-1", &[]).await;
    let auth = format!("Bearer {DO_TOKEN}");
    let headers = [
        ("Authorization", auth.as_str()),
        ("Content-Type", "application/json"),
    ];
    for (method, path, body) in [
        (
            "POST",
            format!("/v2/droplets/{}/actions", d["id"]),
            Some(json!({ "type": "self_destruct" })),
        ),
        (
            "POST",
            "/v2/droplets".to_owned(),
            Some(json!({ "name": "web-5" })),
        ),
        ("GET", "/v2/droplets?per_page=500".to_owned(), None),
        ("GET", "/v2/droplets?tag=env".to_owned(), None),
        ("GET", "/v2/volumes".to_owned(), None),
    ] {
        let before = api.violations().await.len();
        let (status, body) = api.raw(method, &path, &headers, body.as_ref()).await;
        assert_eq!(status, 400, "{method} {path}: {body}");
        assert_eq!(body["id"], "bad_request");
        assert_eq!(
            api.violations().await.len(),
            before + 1,
            "{method} {path} recorded"
        );
    }
}

/// The receiver checks the droplet id an agent claims in its Hello: over
/// the limit ends the session naming the field; a droplet already claimed
/// by another live node is not recorded for the second and is audited.
#[tokio::test]
async fn hello_droplet_ids_are_checked_and_claimed_once() {
    use slipway_controller::proto::limits::MAX_DROPLET_ID;
    use slipway_controller::proto::v1::Hello;

    let controller = crate::support::Controller::start().await;
    let (a, node_a) = controller.enroll("web-1").await;
    let (b, node_b) = controller.enroll("web-2").await;
    let hello = |node_id: &str, droplet_id| Hello {
        node_id: node_id.to_owned(),
        droplet_id,
        ..Hello::default()
    };
    let connect = |state: std::path::PathBuf, hello: Hello| {
        let url = controller.url();
        async move {
            tokio::time::timeout(
                crate::support::TEST_TIMEOUT,
                slipway_agent::link::connect(&url, &state, hello),
            )
            .await
            .unwrap()
        }
    };

    let refused = connect(a.path().to_owned(), hello(&node_a, MAX_DROPLET_ID + 1)).await;
    let Err(err) = refused else {
        panic!("a droplet id over the limit was accepted")
    };
    let err = err.to_string();
    assert!(
        err.contains("hello.droplet_id") && err.contains("limit"),
        "{err}"
    );

    let _first = connect(a.path().to_owned(), hello(&node_a, 4242))
        .await
        .unwrap();
    let _second = connect(b.path().to_owned(), hello(&node_b, 4242))
        .await
        .unwrap();
    let store = controller.store().await;
    let claimed = store.node_droplet_ids().await.unwrap();
    assert!(
        claimed.contains(&(node_a.clone(), "web-1".to_owned(), Some(4242))),
        "{claimed:?}"
    );
    assert!(
        claimed.contains(&(node_b.clone(), "web-2".to_owned(), None)),
        "{claimed:?}"
    );
    let audit = controller.audit().await;
    assert!(
        crate::support::audited(&audit, "DROPLET_CLAIM_REFUSED", |e| e.resource_id == node_b),
        "{audit:#?}"
    );
}
