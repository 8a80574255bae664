use super::*;
use crate::testing::{compute, GOOD_SPEC};
use hyper::header::HOST;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use vmhost_compute_api::{ComputeState, ComputeStatus};

/// One request through a real hyper client, over an in-memory stream.
async fn call(
    compute: &Arc<Compute>,
    method: Method,
    path: &str,
    body: &str,
) -> (StatusCode, Response<Bytes>) {
    let (client, server) = tokio::io::duplex(1 << 16);
    tokio::spawn(serve_connection(compute.clone(), server));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, "computectl")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let bytes = body.collect().await.unwrap().to_bytes();
    (parts.status, Response::from_parts(parts, bytes))
}

fn error_reply(response: &Response<Bytes>) -> ErrorReply {
    serde_json::from_slice(response.body()).unwrap()
}

/// Writes `head` and whatever `body` holds on a raw connection; returns the reply.
async fn raw(compute: &Arc<Compute>, head: &str, body: &[u8]) -> String {
    let (mut client, server): (DuplexStream, DuplexStream) = tokio::io::duplex(4 << 20);
    tokio::spawn(serve_connection(compute.clone(), server));
    client.write_all(head.as_bytes()).await.unwrap();
    client.write_all(body).await.unwrap();
    let mut reply = vec![0u8; 4096];
    let n = client.read(&mut reply).await.unwrap();
    String::from_utf8_lossy(&reply[..n]).into_owned()
}

#[tokio::test]
async fn status_of_a_new_compute() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let (code, response) = call(&compute, Method::GET, "/status", "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(response.headers()[CONTENT_TYPE], "application/json");
    let status: ComputeStatus = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(
        (status.state, status.build_tag.as_str()),
        (ComputeState::Empty, "test")
    );
    let (code, response) = call(&compute, Method::GET, "/spec", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(error_reply(&response).error, "the compute has no spec yet");
}

#[tokio::test]
async fn a_bad_spec_is_refused_with_every_error_and_fails_the_compute() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let bad = r#"{"format_version": 1,
        "roles": [{"name": "postgres", "password_hash": "hunter2"}],
        "databases": [{"name": "app", "owner": "nobody"}],
        "settings": {"port": "5433"}}"#;
    let (code, response) = call(&compute, Method::POST, "/configure", bad).await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    let reply = error_reply(&response);
    assert_eq!(reply.error, "invalid compute spec");
    assert_eq!(reply.errors.len(), 4, "{:?}", reply.errors);
    assert!(reply.errors.iter().all(|e| !e.contains("hunter2")));
    let (_, response) = call(&compute, Method::GET, "/status", "").await;
    let status: ComputeStatus = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(status.state, ComputeState::Failed);
    assert!(status.error.unwrap().contains("owner \"nobody\""));
    // Not JSON at all: refused the same way, with serde's reason.
    let (code, response) = call(&compute, Method::POST, "/configure", "{").await;
    assert_eq!(code, StatusCode::BAD_REQUEST);
    assert!(error_reply(&response).errors[0].contains("EOF"));
}

#[tokio::test]
async fn configure_then_spec_metrics_and_terminate() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let (code, response) = call(&compute, Method::POST, "/configure", GOOD_SPEC).await;
    assert_eq!(code, StatusCode::OK);
    let status: ComputeStatus = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(status.state, ComputeState::Running);
    let (code, response) = call(&compute, Method::GET, "/spec", "").await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(
        vmhost_compute_api::parse(response.body()).unwrap(),
        vmhost_compute_api::parse(GOOD_SPEC.as_bytes()).unwrap()
    );
    let (code, response) = call(&compute, Method::GET, "/metrics", "").await;
    assert_eq!(code, StatusCode::OK);
    let text = String::from_utf8(response.body().to_vec()).unwrap();
    let up: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("compute_ctl_up{"))
        .collect();
    assert_eq!(
        up,
        ["compute_ctl_up{build_tag=\"test\",status=\"running\"} 1"]
    );
    let (code, response) = call(&compute, Method::POST, "/terminate", "").await;
    assert_eq!(code, StatusCode::OK);
    let status: ComputeStatus = serde_json::from_slice(response.body()).unwrap();
    assert_eq!(status.state, ComputeState::Terminated);
    let (code, response) = call(&compute, Method::POST, "/configure", GOOD_SPEC).await;
    assert_eq!(code, StatusCode::CONFLICT);
    assert!(error_reply(&response).error.contains("terminated"));
}

#[tokio::test]
async fn unknown_routes_and_wrong_methods() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let (code, _) = call(&compute, Method::GET, "/nope", "").await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (code, response) = call(&compute, Method::DELETE, "/status", "").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[ALLOW], "GET");
    let (code, response) = call(&compute, Method::GET, "/configure", "").await;
    assert_eq!(code, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(response.headers()[ALLOW], "POST");
    assert_eq!(compute.status().state, ComputeState::Empty);
}

#[tokio::test]
async fn oversized_bodies_are_refused_declared_or_not() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let head = format!(
        "POST /configure HTTP/1.1\r\nhost: c\r\ncontent-length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    let reply = raw(&compute, &head, b"").await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Chunked, with no length up front: cut off once past the limit.
    let chunk = format!("{:x}\r\n{}\r\n", 64 << 10, "x".repeat(64 << 10));
    let body = chunk.repeat(MAX_BODY_BYTES / (64 << 10) + 1);
    let head = "POST /configure HTTP/1.1\r\nhost: c\r\ntransfer-encoding: chunked\r\n\r\n";
    let reply = raw(&compute, head, body.as_bytes()).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    // Neither got as far as the compute.
    assert_eq!(compute.status().state, ComputeState::Empty);
}

#[tokio::test]
async fn garbage_gets_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let reply = raw(&compute, "\x00\x01 not http\r\n\r\n", b"").await;
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );
    let (code, _) = call(&compute, Method::GET, "/status", "").await;
    assert_eq!(code, StatusCode::OK);
}

#[tokio::test(start_paused = true)]
async fn a_stalled_client_loses_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (compute, _) = compute(&dir);
    let (mut client, server) = tokio::io::duplex(4096);
    let served = tokio::spawn(serve_connection(compute.clone(), server));
    client.write_all(b"GET /status HTTP/1.1\r\n").await.unwrap();
    // The head never ends; the connection is closed after the timeout.
    tokio::time::timeout(HEADER_READ_TIMEOUT * 2, served)
        .await
        .expect("the connection should have been closed")
        .unwrap();
}
