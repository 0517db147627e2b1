use super::*;

fn config(url: &str) -> WebhookConfig {
    WebhookConfig {
        name: "ops".into(),
        url: url.into(),
        bearer_env: None,
        bearer_file: None,
        ca_file: None,
        timeout: default_timeout(),
        events: default_events(),
        max_owed: default_max_owed(),
        backoff: default_backoff(),
        give_up_after: default_give_up_after(),
    }
}

fn problems(c: &WebhookConfig) -> Vec<String> {
    let mut errors = Vec::new();
    c.validate("webhooks[0]", &mut errors);
    errors.iter().map(|e| e.to_string()).collect()
}

#[test]
fn urls_are_checked_and_logs_never_show_their_path_or_query() {
    let u = WebhookUrl::parse("https://hooks.example.com/services/T0/B0/SECRET?token=x").unwrap();
    assert_eq!((u.tls, u.port), (true, 443));
    assert_eq!(u.target, "/services/T0/B0/SECRET?token=x");
    assert_eq!(u.shown(), "https://hooks.example.com:443");
    let plain = WebhookUrl::parse("http://127.0.0.1:8080/in").unwrap();
    assert_eq!(
        (plain.tls, plain.port, plain.target.as_str()),
        (false, 8080, "/in")
    );
    // IPv6: connected to without brackets, named with them.
    let v6 = WebhookUrl::parse("http://[::1]:8080/in").unwrap();
    assert_eq!(
        (v6.host.as_str(), v6.host_header.as_str()),
        ("::1", "[::1]")
    );
    assert_eq!(v6.shown(), "http://[::1]:8080");
    let shown = format!("{:?}", config("https://x/hook/SECRET?k=1"));
    assert!(
        !shown.contains("SECRET") && !shown.contains("k=1"),
        "{shown}"
    );
    for (bad, says) in [
        ("ftp://x/y", "scheme"),
        ("https://user:pw@x/y", "credentials"),
        ("https://x/y#frag", "fragment"),
        ("not a url", "not a URL"),
    ] {
        let e = WebhookUrl::parse(bad).unwrap_err();
        assert!(e.contains(says), "{bad}: {e}");
    }
}

#[test]
fn validation_names_each_mistake_with_its_path() {
    assert!(problems(&config("https://x/in")).is_empty());
    let mut c = config("http://x/in");
    c.name = "bad name".into();
    c.ca_file = Some("ca.pem".into());
    c.bearer_env = Some("TOKEN".into());
    c.bearer_file = Some("token".into());
    c.events = vec!["new".into(), "opened".into(), "new".into()];
    c.timeout = Duration::from_millis(10);
    c.max_owed = 0;
    let p = problems(&c).join("\n");
    for want in [
        "webhooks[0].name",
        "webhooks[0].ca_file",
        "not both",
        "webhooks[0].events[1]: \"opened\" is not an event",
        "webhooks[0].events[2]: \"new\" is listed twice",
        "webhooks[0].timeout",
        "webhooks[0].max_owed",
    ] {
        assert!(p.contains(want), "{want} missing from:\n{p}");
    }
    c.events.clear();
    assert!(
        problems(&c)
            .join("\n")
            .contains("webhooks[0].events: empty")
    );
}

#[test]
fn answers_are_delivered_retried_or_refused() {
    assert_eq!(classify(200), Outcome::Delivered);
    assert_eq!(classify(204), Outcome::Delivered);
    // Answers that would refuse every event (a rotated token, a moved receiver) are the
    // webhook being down: retried, never a reason to throw the backlog away.
    for retry in [
        301, 302, 401, 403, 404, 407, 408, 410, 421, 425, 429, 500, 502, 503,
    ] {
        assert!(matches!(classify(retry), Outcome::Retry(_)), "{retry}");
    }
    for refuse in [400, 409, 413, 415, 422] {
        assert!(matches!(classify(refuse), Outcome::Refused(_)), "{refuse}");
    }
}

#[test]
fn the_idempotency_key_is_the_event_and_its_spool_sequence() {
    let d = Delivery {
        seq: 42,
        alert_id: "01ALERT".into(),
        kind: AlertChange::Update,
        payload: Vec::new(),
    };
    assert_eq!(d.key(), "01ALERT:update:42");
    let c = config("https://x/in");
    assert!(c.wants(AlertChange::End));
    let only_new = WebhookConfig {
        events: vec!["new".into()],
        ..c
    };
    assert!(only_new.wants(AlertChange::New) && !only_new.wants(AlertChange::Update));
}

#[test]
fn a_missing_token_is_a_start_up_error_and_the_token_never_shows() {
    let mut c = config("http://127.0.0.1:9/in?secret=1");
    c.bearer_env = Some("DFWATCH_TEST_WEBHOOK_TOKEN_UNSET".into());
    let e = Webhook::prepare(&c, Path::new("."))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("webhooks.ops.bearer_env") && e.contains("not set"),
        "{e}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), "s3cret-token\n").unwrap();
    c.bearer_env = None;
    c.bearer_file = Some("token".into());
    let w = Webhook::prepare(&c, dir.path()).unwrap();
    let shown = format!("{w:?}");
    assert!(
        !shown.contains("s3cret") && !shown.contains("secret=1"),
        "{shown}"
    );
    std::fs::write(dir.path().join("token"), "two\nlines").unwrap();
    let e = Webhook::prepare(&c, dir.path()).unwrap_err().to_string();
    assert!(e.contains("line break"), "{e}");
}
