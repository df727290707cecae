//! The metrics listener's limits, as a misbehaving client meets them: a
//! client that never finishes its request head is disconnected, an oversized
//! request head is refused, and a normal scrape still works.

mod common;

use std::time::Duration;

use common::*;
use portcullis::telemetry::metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or the generous deadline
/// passes, which fails the test: this waits for an event, it times nothing).
async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read_to_end(&mut received));
    match read.await {
        Ok(_) => received,
        Err(_) => panic!("the metrics listener kept a stalled connection open"),
    }
}

#[tokio::test]
async fn a_request_head_that_never_ends_is_cut_off() {
    let fx = Fixture::new();
    let running = fx.serve_unloaded().await;
    let server = metrics::serve("127.0.0.1:0".parse().unwrap(), running.state().clone())
        .await
        .unwrap();
    let mut slow = TcpStream::connect(server.local_addr()).await.unwrap();
    // A slowloris: the request line and one header, never the blank line.
    slow.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    read_until_closed(&mut slow).await;

    // A well-behaved scrape is still answered.
    let mut scrape = TcpStream::connect(server.local_addr()).await.unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let reply = String::from_utf8_lossy(&read_until_closed(&mut scrape).await).into_owned();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let fx = Fixture::new();
    let running = fx.serve_unloaded().await;
    let server = metrics::serve("127.0.0.1:0".parse().unwrap(), running.state().clone())
        .await
        .unwrap();
    let mut client = TcpStream::connect(server.local_addr()).await.unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\nconnection: close\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    // The server may close before it has read everything: a failed write is
    // part of the refusal.
    let _ = client.write_all(request.as_bytes()).await;
    let reply = String::from_utf8_lossy(&read_until_closed(&mut client).await).into_owned();
    assert!(
        !reply.starts_with("HTTP/1.1 200"),
        "served a 64 KiB request head"
    );
}
