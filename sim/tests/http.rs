//! The simulator over real HTTP on loopback.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::*;
use mixpanel_sim::{
    AuthKind, Fault, FaultRule, Gate, RateLimit, ServiceAccount, SimConfig, Simulator, TimeMode,
};
use serde_json::Value;

fn day_params(day: mixpanel_sim::Date) -> Vec<(&'static str, String)> {
    vec![("from_date", day.to_string()), ("to_date", day.to_string())]
}

fn rule(fault: Fault) -> FaultRule {
    FaultRule {
        path: "/api/2.0/export".into(),
        from_date: None,
        times: 1,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        fault,
    }
}

async fn json(resp: reqwest::Response) -> Value {
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

#[tokio::test]
async fn auth_forms() {
    let sa = ServiceAccount {
        username: "bot.abc123.mp-service-account".into(),
        secret: "sa-secret".into(),
        project_id: 42,
    };
    let sim = Simulator::new(SimConfig {
        service_account: Some(sa),
        ..recent(1, 20)
    });
    let srv = sim.serve(0).await.unwrap();
    let url = format!("{}/api/2.0/export", srv.url());
    let c = raw_client();
    let day = add_days(today_utc(), -1);
    let send = |auth: Option<String>, project: Option<&str>| {
        let mut q = day_params(day);
        if let Some(p) = project {
            q.push(("project_id", p.to_string()));
        }
        let mut r = c.get(&url).query(&q);
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    let expected = body(&sim, day, day, None, None);
    assert!(!expected.is_empty());

    let r = send(Some(basic(SECRET)), None).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), expected);
    let r = send(Some(basic(&format!("{SECRET}:"))), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), expected);
    // reqwest's own basic auth is the with-colon form.
    let r = c
        .get(&url)
        .query(&day_params(day))
        .basic_auth(SECRET, None::<&str>)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let sa_auth = basic("bot.abc123.mp-service-account:sa-secret");
    let r = send(Some(sa_auth.clone()), Some("42")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), expected);
    let r = send(Some(sa_auth.clone()), None).await.unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        json(r).await["error"]
            .as_str()
            .unwrap()
            .contains("project_id")
    );
    let r = send(Some(sa_auth), Some("43")).await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(json(r).await["error"].as_str().unwrap().contains("43"));

    for bad in [
        Some(basic("wrong")),
        Some(basic("wrong:")),
        Some(basic(&format!("{SECRET}:pw"))),
        Some("Bearer x".into()),
        None,
    ] {
        let r = send(bad, None).await.unwrap();
        assert_eq!(r.status(), 401);
        assert_eq!(
            json(r).await,
            serde_json::json!({"error": "Invalid credentials"})
        );
    }

    let kinds: Vec<(AuthKind, u16)> = sim.requests().iter().map(|r| (r.auth, r.status)).collect();
    assert_eq!(
        kinds,
        vec![
            (AuthKind::SecretNoColon, 200),
            (AuthKind::SecretWithColon, 200),
            (AuthKind::SecretWithColon, 200),
            (AuthKind::ServiceAccount, 200),
            (AuthKind::ServiceAccount, 400),
            (AuthKind::ServiceAccount, 403),
            (AuthKind::Invalid, 401),
            (AuthKind::Invalid, 401),
            (AuthKind::Invalid, 401),
            (AuthKind::Invalid, 401),
            (AuthKind::Missing, 401),
        ]
    );
    assert!(
        sim.requests()
            .iter()
            .all(|r| r.path == "/api/2.0/export" && r.method == "GET" && !r.faulted)
    );
    assert!(sim.requests()[0].query.contains("from_date="));
}

#[tokio::test]
async fn gzip_and_plain_bodies_match_the_library() {
    // Big enough for many chunks.
    let sim = Simulator::new(recent(2, 2000));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let (from, to) = (add_days(today_utc(), -3), add_days(today_utc(), -2));
    let q = vec![("from_date", from.to_string()), ("to_date", to.to_string())];
    let expected = body(&sim, from, to, None, None);
    assert!(expected.len() > 1 << 20);

    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.bytes().await.unwrap(), expected);

    let r = c
        .get(format!("{}/api/2.0/export", srv.url()))
        .query(&q)
        .header("Authorization", basic(SECRET))
        .header("Accept-Encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let gz = r.bytes().await.unwrap();
    assert!(gz.len() < expected.len() / 3);
    let mut plain = Vec::new();
    flate2::read::GzDecoder::new(&gz[..])
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, expected);

    // A client that decompresses transparently sees the same.
    let auto = reqwest::Client::new();
    let r = export(&auto, &srv.url(), &q).await;
    assert_eq!(r.bytes().await.unwrap(), expected);
}

#[tokio::test]
async fn parameters() {
    let sim = Simulator::new(recent(3, 300));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let day = add_days(today_utc(), -4);
    let all = lines(&body(&sim, day, day, None, None));

    // where: one hour.
    let start = day
        .to_zoned_datetime(jiff::tz::TimeZone::UTC)
        .unwrap()
        .timestamp()
        .as_second()
        + 5 * 3600;
    let mut q = day_params(day);
    q.push((
        "where",
        format!(
            r#"properties["$time"]>=datetime({start}) and properties["$time"]<datetime({})"#,
            start + 3600
        ),
    ));
    let got = lines(&export(&c, &srv.url(), &q).await.bytes().await.unwrap());
    let want: Vec<Value> = all
        .iter()
        .filter(|l| (start..start + 3600).contains(&l["properties"]["time"].as_i64().unwrap()))
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // event: URL-encoded JSON array.
    let mut q = day_params(day);
    q.push((
        "event",
        r#"["Purchase","Ünïcode Évent 🎉","Button \"Clicked\""]"#.into(),
    ));
    let got = lines(&export(&c, &srv.url(), &q).await.bytes().await.unwrap());
    let names = ["Purchase", "Ünïcode Évent 🎉", "Button \"Clicked\""];
    let want: Vec<Value> = all
        .iter()
        .filter(|l| names.contains(&l["event"].as_str().unwrap()))
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    // limit and time_in_ms.
    let mut q = day_params(day);
    q.push(("limit", "5".into()));
    q.push(("time_in_ms", "true".into()));
    let got = lines(&export(&c, &srv.url(), &q).await.bytes().await.unwrap());
    assert_eq!(got.len(), 5);
    for (g, a) in got.iter().zip(&all) {
        assert_eq!(
            g["properties"]["time"].as_i64().unwrap() / 1000,
            a["properties"]["time"].as_i64().unwrap()
        );
    }

    // POST with a form body answers like GET.
    let r = c
        .post(format!("{}/api/2.0/export", srv.url()))
        .header("Authorization", basic(SECRET))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body(format!("from_date={day}&to_date={day}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(lines(&r.bytes().await.unwrap()), all);

    // Days without data: empty 200.
    let before = add_days(sim.config().first_day, -3);
    let r = export(&c, &srv.url(), &day_params(before)).await;
    assert_eq!(r.status(), 200);
    assert!(r.bytes().await.unwrap().is_empty());

    // Bad parameters: 400 with Mixpanel's error shape.
    let bad: Vec<Vec<(&str, String)>> = vec![
        vec![("to_date", day.to_string())],
        vec![
            ("from_date", "2024-13-01".into()),
            ("to_date", day.to_string()),
        ],
        vec![
            ("from_date", day.to_string()),
            ("to_date", add_days(day, -1).to_string()),
        ],
        [
            day_params(day),
            vec![("where", r#"properties["$city"] == "x""#.into())],
        ]
        .concat(),
        [day_params(day), vec![("event", "Purchase".into())]].concat(),
        [day_params(day), vec![("limit", "0".into())]].concat(),
        [day_params(day), vec![("limit", "100001".into())]].concat(),
    ];
    for q in bad {
        let r = export(&c, &srv.url(), &q).await;
        assert_eq!(r.status(), 400, "{q:?}");
        let v = json(r).await;
        assert!(
            v["request"]
                .as_str()
                .unwrap()
                .starts_with("/api/2.0/export?"),
            "{v}"
        );
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
}

#[tokio::test]
async fn to_date_later_than_today() {
    for (tz, mode) in [
        ("UTC", TimeMode::Utc),
        ("Pacific/Kiritimati", TimeMode::ProjectLocal),
        ("Pacific/Pago_Pago", TimeMode::ProjectLocal),
    ] {
        let sim = Simulator::new(SimConfig {
            timezone: tz.into(),
            time_mode: mode,
            ..recent(4, 10)
        });
        let srv = sim.serve(0).await.unwrap();
        let c = raw_client();
        let today = match mode {
            TimeMode::Utc => today_utc(),
            TimeMode::ProjectLocal => jiff::Timestamp::now().in_tz(tz).unwrap().date(),
        };
        let r = export(&c, &srv.url(), &day_params(today)).await;
        assert_eq!(r.status(), 200, "{tz}");
        let r = export(&c, &srv.url(), &day_params(add_days(today, 1))).await;
        assert_eq!(r.status(), 400, "{tz}");
        let v = json(r).await;
        assert_eq!(v["error"], "to_date cannot be later than today");
        assert!(v["request"].as_str().unwrap().contains("to_date="));
    }
}

#[tokio::test]
async fn faults() {
    let sim = Simulator::new(recent(5, 200));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let day = add_days(today_utc(), -2);
    let q = day_params(day);
    let full = body(&sim, day, day, None, None);
    let full_lines: Vec<&[u8]> = full.split_inclusive(|b| *b == b'\n').collect();

    sim.push_fault(rule(Fault::RateLimited {
        retry_after_secs: Some(7),
    }));
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let v = json(r).await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("Query rate limit exceeded for project_id: 1.")
    );
    assert!(
        v["request"]
            .as_str()
            .unwrap()
            .starts_with("/api/2.0/export?from_date=")
    );
    sim.push_fault(rule(Fault::RateLimited {
        retry_after_secs: None,
    }));
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().get("retry-after").is_none());
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 200, "rules are used up");
    assert_eq!(r.bytes().await.unwrap(), full);

    for status in [500u16, 502, 503] {
        sim.push_fault(rule(Fault::ServerError { status }));
        let r = export(&c, &srv.url(), &q).await;
        assert_eq!(r.status(), status);
        assert!(!r.bytes().await.unwrap().is_empty());
    }

    sim.push_fault(rule(Fault::TerminatedEarly { after_lines: 3 }));
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 200);
    let b = r.bytes().await.unwrap();
    assert_eq!(
        b,
        [full_lines[..3].concat(), b"terminated early\n".to_vec()].concat()
    );

    for gzip in [false, true] {
        sim.push_fault(rule(Fault::CutBody { after_lines: 3 }));
        let mut req = c
            .get(format!("{}/api/2.0/export", srv.url()))
            .query(&q)
            .header("Authorization", basic(SECRET));
        if gzip {
            req = req.header("Accept-Encoding", "gzip");
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(
            r.bytes().await.is_err(),
            "a cut body is an error, not a clean end (gzip: {gzip})"
        );
    }
    // The client sees the partial lines before the break.
    sim.push_fault(rule(Fault::CutBody { after_lines: 2 }));
    let mut r = export(&c, &srv.url(), &q).await;
    let mut got = Vec::new();
    let err = loop {
        match r.chunk().await {
            Ok(Some(chunk)) => got.extend_from_slice(&chunk),
            Ok(None) => break false,
            Err(_) => break true,
        }
    };
    assert!(err);
    let two = full_lines[..2].concat();
    assert!(
        got.starts_with(&two) && got.len() > two.len() && !got.ends_with(b"\n"),
        "{}",
        got.len()
    );

    sim.push_fault(rule(Fault::SlowFirstByte {
        delay: Duration::from_millis(300),
    }));
    let t = Instant::now();
    let r = export(&c, &srv.url(), &q).await;
    assert!(t.elapsed() >= Duration::from_millis(300));
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), full);

    sim.push_fault(rule(Fault::Status {
        status: 200,
        body: "<html>maintenance</html>".into(),
    }));
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    assert_eq!(r.text().await.unwrap(), "<html>maintenance</html>");

    // from_date narrows a rule; times counts uses.
    let other = add_days(day, -1);
    sim.push_fault(FaultRule {
        from_date: Some(other),
        times: 2,
        covering: None,
        wider_than: None,
        holding: None,
        param: None,
        ..rule(Fault::Status {
            status: 400,
            body: r#"{"error": "Timeout Error."}"#.into(),
        })
    });
    assert_eq!(export(&c, &srv.url(), &q).await.status(), 200);
    assert_eq!(
        export(&c, &srv.url(), &day_params(other)).await.status(),
        400
    );
    assert_eq!(
        export(&c, &srv.url(), &day_params(other)).await.status(),
        400
    );
    assert_eq!(
        export(&c, &srv.url(), &day_params(other)).await.status(),
        200
    );

    sim.push_fault(rule(Fault::ServerError { status: 500 }));
    sim.clear_faults();
    assert_eq!(export(&c, &srv.url(), &q).await.status(), 200);

    let log: Vec<(u16, bool)> = sim
        .requests()
        .iter()
        .map(|r| (r.status, r.faulted))
        .collect();
    assert_eq!(log.iter().filter(|(_, f)| *f).count(), 13);
    assert_eq!(log[0], (429, true));
    assert_eq!(log[2], (200, false));
    assert!(sim.requests().windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_answers_wait_for_their_gate() {
    let sim = Simulator::new(recent(5, 200));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let day = add_days(today_utc(), -2);
    let q = day_params(day);
    let full = body(&sim, day, day, None, None);
    let full_lines: Vec<&[u8]> = full.split_inclusive(|b| *b == b'\n').collect();

    // No byte of a held answer comes before its gate opens, however long the client waits.
    let gate = Gate::new();
    sim.push_fault(rule(Fault::Held { gate: gate.clone() }));
    let pending = tokio::spawn({
        let (c, url, q) = (c.clone(), srv.url(), q.clone());
        async move { export(&c, &url, &q).await }
    });
    let waited = tokio::time::timeout(Duration::from_millis(300), async {
        while gate.held() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the request reached the gate");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "no answer while the gate is closed");
    gate.open();
    let r = pending.await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap(), full);
    assert_eq!(gate.held(), 1);
    // An open gate holds nothing.
    sim.push_fault(rule(Fault::Held { gate: gate.clone() }));
    assert_eq!(
        export(&c, &srv.url(), &q).await.bytes().await.unwrap(),
        full
    );

    // A held body: the lines before the gate, then nothing until it opens, then the rest.
    let gate = Gate::new();
    sim.push_fault(rule(Fault::HeldBody {
        after_lines: 3,
        gate: gate.clone(),
    }));
    let mut r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 200);
    let three = full_lines[..3].concat();
    let mut got = Vec::new();
    while got.len() < three.len() {
        got.extend_from_slice(&r.chunk().await.unwrap().unwrap());
    }
    assert_eq!(got, three);
    let more = tokio::time::timeout(Duration::from_millis(300), r.chunk()).await;
    assert!(more.is_err(), "nothing more while the gate is closed");
    assert_eq!(gate.held(), 1);
    gate.open();
    while let Some(chunk) = r.chunk().await.unwrap() {
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, full);

    // A client that gives up on a held body frees the simulator's thread; the next answer
    // is whole.
    let gate = Gate::new();
    sim.push_fault(rule(Fault::HeldBody {
        after_lines: 1,
        gate: gate.clone(),
    }));
    let mut r = export(&c, &srv.url(), &q).await;
    let mut got = Vec::new();
    while got.len() < full_lines[0].len() {
        got.extend_from_slice(&r.chunk().await.unwrap().unwrap());
    }
    assert_eq!(got, full_lines[0]);
    drop(r);
    assert_eq!(
        export(&c, &srv.url(), &q).await.bytes().await.unwrap(),
        full
    );
    assert!(!gate.is_open());
}

#[tokio::test]
async fn rate_limit_sliding_window() {
    let limit = RateLimit {
        requests: 3,
        window: Duration::from_millis(600),
    };
    let sim = Simulator::new(SimConfig {
        rate_limit: Some(limit),
        ..recent(6, 10)
    });
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let q = day_params(add_days(today_utc(), -1));
    for _ in 0..3 {
        assert_eq!(export(&c, &srv.url(), &q).await.status(), 200);
    }
    let r = export(&c, &srv.url(), &q).await;
    assert_eq!(r.status(), 429);
    let v = json(r).await;
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .starts_with("Query rate limit exceeded for project_id: 1.")
    );
    tokio::time::sleep(Duration::from_millis(650)).await;
    assert_eq!(export(&c, &srv.url(), &q).await.status(), 200);
    let statuses: Vec<u16> = sim.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, vec![200, 200, 200, 429, 200]);
}

#[tokio::test]
async fn late_events_over_http() {
    let sim = Simulator::new(recent(7, 100));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let day = add_days(today_utc(), -5);
    let before = export(&c, &srv.url(), &day_params(day))
        .await
        .bytes()
        .await
        .unwrap();
    sim.add_late_events(day, 4);
    let after = export(&c, &srv.url(), &day_params(day))
        .await
        .bytes()
        .await
        .unwrap();
    assert!(after.starts_with(&before));
    assert_eq!(lines(&after).len(), lines(&before).len() + 5);
    let truth = sim.export_ground_truth(day, None);
    assert_eq!(
        canon(&truth),
        canon(&reference_rows(sim.config(), &lines(&after), day))
    );
}

#[tokio::test]
async fn other_paths() {
    let sim = Simulator::new(recent(8, 10));
    let srv = sim.serve(0).await.unwrap();
    let c = raw_client();
    let r = c
        .get(format!("{}/_sim/health", srv.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ok");
    let r = c
        .get(format!("{}/api/2.0/nope", srv.url()))
        .header("Authorization", basic(SECRET))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(json(r).await["error"].is_string());
    assert_eq!(sim.requests().len(), 1, "health checks are not logged");

    // Dropping the handle stops the server.
    let url = srv.url();
    drop(srv);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        reqwest::Client::new()
            .get(format!("{url}/_sim/health"))
            .send()
            .await
            .is_err()
    );
}

#[test]
fn binary_prints_its_url_and_serves() {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mixpanel-sim"))
        .args([
            "--port",
            "0",
            "--seed",
            "9",
            "--timezone",
            "Europe/Paris",
            "--time-mode",
            "project-local",
            "--days",
            "3",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("{line:?}"))
        .to_string();
    assert!(url.starts_with("http://127.0.0.1:"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        let day = jiff::Timestamp::now().in_tz("Europe/Paris").unwrap().date();
        export(&raw_client(), &url, &day_params(add_days(day, -1)))
            .await
            .status()
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
}
