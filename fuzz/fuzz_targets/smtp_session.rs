//! Arbitrary bytes as the client side of an SMTP session with
//! `hispd::smtp::server::serve_connection` over an in-memory stream (no TLS).
//! The handler accepts every sender and recipient and discards the data. The
//! client writes the input, half-closes and reads every reply while the
//! server runs. The first byte picks the listener: MX, submission from a
//! trusted network (no AUTH needed), or submission from elsewhere.
#![no_main]

use hispd::smtp::server::{
    serve_connection, Envelope, HandlerFuture, ListenerKind, Network, Reply, SessionConfig,
    SmtpHandler,
};
use libfuzzer_sys::fuzz_target;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

/// Accepts everything, keeps nothing.
struct AcceptAll;

impl SmtpHandler for AcceptAll {
    fn authenticate(&self, user: &str, _password: &str) -> Option<String> {
        Some(user.to_string())
    }
    fn check_mail_from(&self, _: ListenerKind, _: &Envelope, _: &str) -> Result<(), Reply> {
        Ok(())
    }
    fn check_rcpt(&self, _: ListenerKind, _: &Envelope, _: &str) -> Result<(), Reply> {
        Ok(())
    }
    fn data<'a>(&'a self, _: ListenerKind, _: &'a Envelope, message: Vec<u8>) -> HandlerFuture<'a> {
        Box::pin(async move {
            drop(message);
            Reply::new(250, "2.0.0", "discarded")
        })
    }
}

struct World {
    runtime: Runtime,
    configs: [Arc<SessionConfig>; 3],
    handler: Arc<AcceptAll>,
    remote: SocketAddr,
}

fn config(kind: ListenerKind, trusted_networks: Vec<Network>) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: "mx.fuzz.example".into(),
        kind,
        max_message_size: 16 * 1024,
        max_recipients: 10,
        tls: None,
        // The client always half-closes, so these are never waited out.
        command_timeout: Duration::from_secs(5),
        data_timeout: Duration::from_secs(5),
        trusted_networks,
        memory: None,
    })
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| World {
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime"),
        configs: [
            config(ListenerKind::Mx, Vec::new()),
            config(
                ListenerKind::Submission,
                vec!["192.0.2.0/24".parse().expect("a network")],
            ),
            config(ListenerKind::Submission, Vec::new()),
        ],
        handler: Arc::new(AcceptAll),
        remote: "192.0.2.25:40000".parse().expect("an address"),
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let Some((kind, input)) = data.split_first() else {
        return;
    };
    let w = world();
    let config = w.configs[usize::from(*kind) % 3].clone();
    w.runtime.block_on(async {
        let (client, server) = tokio::io::duplex(8 * 1024);
        let (mut reader, mut writer) = tokio::io::split(client);
        let session = serve_connection(server, w.remote, config, w.handler.clone());
        let send = async move {
            let _ = writer.write_all(input).await;
            let _ = writer.shutdown().await;
        };
        let drain = async move {
            let mut replies = Vec::new();
            let _ = reader.read_to_end(&mut replies).await;
        };
        let all = async { tokio::join!(session, send, drain) };
        if tokio::time::timeout(Duration::from_secs(20), all)
            .await
            .is_err()
        {
            panic!("the SMTP session did not end within 20 s after the client closed");
        }
    });
});
