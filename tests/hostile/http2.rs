//! HTTP/2 as a hostile client speaks it, in raw frames: stalled bodies, rapid resets,
//! CONTINUATION floods.

use super::*;

/// HTTP/2 (prior knowledge on the plain listener): a stream whose body stops is answered 408
/// and reset; the connection's other streams are served.
#[tokio::test]
async fn an_http2_request_body_that_stalls_gets_408() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(
        &[B::sim(&s)],
        "",
        "header_read_timeout = \"400ms\"\nbody_read_timeout = \"1s\"",
    )
    .await;
    let tcp = TcpStream::connect(gw.gateway.addr).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut h2 = h2.ready().await.unwrap();
    let req = || {
        http::Request::post(format!("http://gw{CHAT}"))
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    // Headers, two bytes of body, then nothing.
    let (answer, mut send) = h2.send_request(req(), false).unwrap();
    send.send_data(bytes::Bytes::from_static(b"{\""), false)
        .unwrap();
    let started = std::time::Instant::now();
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .expect("no answer to a stalled body")
        .unwrap();
    assert_eq!(answer.status(), 408);
    assert!(started.elapsed() >= Duration::from_millis(300));
    let mut answer_body = answer.into_body();
    let mut text = Vec::new();
    while let Some(chunk) = answer_body.data().await {
        text.extend_from_slice(&chunk.unwrap());
    }
    assert!(
        String::from_utf8_lossy(&text).contains("request_body_timeout"),
        "{}",
        String::from_utf8_lossy(&text)
    );
    // The connection still serves a whole request.
    let mut h2 = h2.ready().await.unwrap();
    let body = chat_body(false);
    let (answer, mut send) = h2.send_request(req(), false).unwrap();
    send.send_data(bytes::Bytes::from(body), true).unwrap();
    let answer = tokio::time::timeout(PATIENCE, answer)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer.status(), 200);
    drop(h2);
    driver.abort();
    assert_eq!(s.requests().len(), 1);
    gw.stop().await;
}

/// One HTTP/2 frame: length, type, flags, stream, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An HPACK header block for a chat completion request, every field a plain literal.
fn h2_request_block() -> Vec<u8> {
    let literal = |index: u8, value: &str| {
        let mut b = vec![index, value.len() as u8];
        b.extend_from_slice(value.as_bytes());
        b
    };
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    block.extend(literal(0x04, "/openai/deployments/gpt-4o/chat/completions")); // :path
    block.extend(literal(0x01, "gw")); // :authority
    block
}

/// Reads frames until the server closes; returns the GOAWAY error code, if one came.
async fn h2_goaway(conn: &mut TcpStream) -> Option<u32> {
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            match conn.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => bytes.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the connection stayed open");
    let mut at = 0;
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        if bytes[at + 3] == 7 && at + 9 + 8 <= bytes.len() {
            let code = &bytes[at + 13..at + 17];
            return Some(u32::from_be_bytes([code[0], code[1], code[2], code[3]]));
        }
        at += 9 + len;
    }
    None
}

/// HTTP/2 abuse ends the connection with a GOAWAY and costs the backends next to nothing:
/// streams opened and reset at once (rapid reset), and a header block that never ends
/// (CONTINUATION flood).
#[tokio::test]
async fn http2_rapid_resets_and_continuation_floods_end_the_connection() {
    let s = start_sim(sim("east")).await;
    let gw = gateway(&[B::sim(&s)], "", "").await;
    let addr = gw.gateway.addr;

    // Rapid reset: a thousand streams, each reset as soon as it is opened.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut burst = H2_PREFACE.to_vec();
    burst.extend(h2_frame(4, 0, 0, &[])); // SETTINGS
    let block = h2_request_block();
    for i in 0..1000u32 {
        let stream = 1 + 2 * i;
        burst.extend(h2_frame(1, 0x4 | 0x1, stream, &block)); // HEADERS, END_HEADERS|END_STREAM
        burst.extend(h2_frame(3, 0, stream, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = conn.write_all(&burst).await;
    let code = h2_goaway(&mut conn).await;
    assert_eq!(
        code,
        Some(0xb),
        "rapid reset: GOAWAY ENHANCE_YOUR_CALM expected"
    );
    assert!(
        s.requests().len() < 100,
        "rapid reset: {} requests reached the backend",
        s.requests().len()
    );

    // CONTINUATION flood: a header block that goes on and on.
    let mut conn = TcpStream::connect(addr).await.unwrap();
    let mut start = H2_PREFACE.to_vec();
    start.extend(h2_frame(4, 0, 0, &[]));
    start.extend(h2_frame(1, 0, 1, &block)); // HEADERS without END_HEADERS
    conn.write_all(&start).await.unwrap();
    let mut filler = Vec::new();
    for i in 0..100 {
        // Literal without indexing, new name: `x-fill-NN: 100 bytes`.
        let name = format!("x-fill-{i:02}");
        filler.push(0x00);
        filler.push(name.len() as u8);
        filler.extend_from_slice(name.as_bytes());
        filler.push(100);
        filler.extend_from_slice(&[b'a'; 100]);
    }
    let continuation = h2_frame(9, 0, 1, &filler);
    let (mut reader, mut writer) = conn.into_split();
    let flood = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < (64 << 20) && writer.write_all(&continuation).await.is_ok() {
            sent += continuation.len();
        }
        sent
    });
    let mut bytes = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, reader.read_to_end(&mut bytes)).await;
    assert!(
        closed.is_ok(),
        "CONTINUATION flood: the connection stayed open"
    );
    let sent = flood.await.unwrap();
    // What the header block limit (64 KiB) lets in, plus what the two sockets' buffers hold
    // at most on the way.
    let (rmem, wmem) = tcp_buffer_maxima();
    let bound = (rmem + wmem) as usize + (1 << 20);
    assert!(
        sent < bound,
        "CONTINUATION flood: {sent} bytes of one header block went in (bound {bound})"
    );
    // The gateway still serves.
    assert_eq!(post_chat(&client(), &gw.base).await.status(), 200);
    gw.stop().await;
}
