//! A `moto_server` process on a free loopback port, stopped when dropped.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running moto server (S3, DynamoDB, Secrets Manager) for one test binary.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// Starts moto (installed by `scripts/test` into `.tools/venv`) through
    /// `scripts/moto_atomic.py`, which serializes requests so that conditional writes are atomic
    /// as in DynamoDB, and waits until it answers.
    pub fn start() -> Moto {
        let root = env!("CARGO_MANIFEST_DIR");
        let python = std::env::var("MOTO_PYTHON")
            .unwrap_or_else(|_| format!("{root}/.tools/venv/bin/python"));
        if !std::path::Path::new(&python).exists() {
            panic!("{python} not found: run scripts/test (it installs the pinned moto[server])");
        }
        let port = free_port();
        let child = Command::new(&python)
            .arg(format!("{root}/scripts/moto_atomic.py"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start moto with {python}: {e}"));
        let moto = Moto { child, port };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "moto_server did not start within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        moto
    }

    /// `http://127.0.0.1:PORT`: an IP endpoint, so S3 uses path-style addressing.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// An AWS SDK configuration pointed at this server with dummy credentials.
    pub async fn sdk_config(&self) -> aws_config::SdkConfig {
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(self.endpoint())
            .credentials_provider(aws_sdk_s3::config::Credentials::new(
                "testing", "testing", None, None, "moto",
            ))
            .load()
            .await
    }

    /// Environment for a child process (the replicator binary) to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL".into(), self.endpoint()),
            ("AWS_REGION".into(), "us-east-1".into()),
            ("AWS_ACCESS_KEY_ID".into(), "testing".into()),
            ("AWS_SECRET_ACCESS_KEY".into(), "testing".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free loopback port")
}
