//! Usage read from plain and streamed answers, the usage chunk asked for and stripped.

mod basics {
    use crate::usage::*;

    const STREAM: &str = concat!(
        "data: {\"id\":\"\",\"choices\":[],\"prompt_filter_results\":[]}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{\"content\":\"hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"id\":\"c\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
        "data: [DONE]\n\n"
    );

    fn run(tap: &mut Tap, chunks: &[&[u8]]) -> (Vec<u8>, Option<Usage>) {
        let mut out = Vec::new();
        for c in chunks {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(c)));
        }
        let (rest, usage) = tap.finish();
        out.extend_from_slice(&rest);
        (out, usage)
    }

    fn want() -> Option<Usage> {
        Some(Usage {
            prompt_tokens: 9,
            completion_tokens: 2,
            total_tokens: 11,
            ..Usage::default()
        })
    }

    #[test]
    fn reads_usage_from_a_stream_and_passes_it_through_untouched() {
        let events: Vec<&[u8]> = split_events(STREAM.as_bytes()).collect();
        let mut tap = Tap::new(Some("text/event-stream; charset=utf-8"), false).unwrap();
        let (out, usage) = run(&mut tap, &events);
        assert_eq!(out, STREAM.as_bytes());
        assert_eq!(usage, want());
    }

    #[test]
    fn events_split_anywhere_are_reassembled() {
        let bytes = STREAM.as_bytes();
        for cut in [1, 7, 33, 100, bytes.len() - 3] {
            for strip in [false, true] {
                let mut tap = Tap::new(Some("text/event-stream"), strip).unwrap();
                let (out, usage) = run(&mut tap, &[&bytes[..cut], &bytes[cut..]]);
                assert_eq!(usage, want(), "cut at {cut}");
                if !strip {
                    assert_eq!(out, bytes);
                }
            }
        }
    }

    #[test]
    fn strips_the_usage_it_asked_for() {
        let mut tap = Tap::new(Some("text/event-stream"), true).unwrap();
        let (out, usage) = run(&mut tap, &[STREAM.as_bytes()]);
        assert_eq!(usage, want());
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("usage"), "{text}");
        assert!(text.contains("\"content\":\"hi\""));
        assert!(
            text.starts_with("data: {\"id\":\"\",\"choices\":[],\"prompt_filter_results\""),
            "Azure's filter event stays"
        );
        assert!(text.ends_with("data: [DONE]\n\n"));
        assert_eq!(text.matches("\n\n").count(), 4);
    }

    #[test]
    fn the_stripped_stream_is_the_same_however_it_is_cut() {
        let stream = concat!(
            "data: {\"usage\":null,\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            "data:{\"id\":\"b\",\"choices\":[{\"delta\":{\"content\":\"y\"}}],\"usage\": null}\n\n",
            "data: {\"id\":\"c\",\"usage\":null}\n\n",
            "data: {\"id\":\"d\",\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n",
            "data: [DONE]\n\n"
        );
        let stripped = concat!(
            "data: {\"id\":\"a\",\"choices\":[{\"delta\":{\"content\":\"x\"}}]}\n\n",
            "data:{\"id\":\"b\",\"choices\":[{\"delta\":{\"content\":\"y\"}}]}\n\n",
            "data: {\"id\":\"c\"}\n\n",
            "data: [DONE]\n\n"
        );
        for step in [1, 2, 7, 64, stream.len()] {
            let pieces: Vec<&[u8]> = stream.as_bytes().chunks(step).collect();
            let mut tap = Tap::new(Some("text/event-stream"), true).unwrap();
            let (out, usage) = run(&mut tap, &pieces);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                stripped,
                "pieces of {step}"
            );
            assert_eq!(usage, want());
            // Not stripping, the same pieces pass on as they came.
            let mut tap = Tap::new(Some("text/event-stream"), false).unwrap();
            let (out, usage) = run(&mut tap, &pieces);
            assert_eq!(String::from_utf8(out).unwrap(), stream, "pieces of {step}");
            assert_eq!(usage, want());
        }
    }

    #[test]
    fn reads_usage_from_json_bodies_of_any_size() {
        let mut big = String::from("{\"object\":\"list\",\"data\":[");
        for i in 0..20_000 {
            big.push_str(&format!("{{\"embedding\":[0.1,0.2],\"index\":{i}}},"));
        }
        big.push_str("{}],\"usage\":{\"prompt_tokens\":9,\"total_tokens\":9}}");
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        let chunks: Vec<&[u8]> = big.as_bytes().chunks(1000).collect();
        let (out, usage) = run(&mut tap, &chunks);
        assert_eq!(out.len(), big.len());
        assert_eq!(
            usage,
            Some(Usage {
                prompt_tokens: 9,
                completion_tokens: 0,
                total_tokens: 9,
                ..Usage::default()
            })
        );
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        assert_eq!(run(&mut tap, &[b"{\"error\":{}}"]).1, None);
        assert!(Tap::new(Some("audio/mpeg"), false).is_none());
    }

    #[test]
    fn asks_for_usage_only_on_streams_that_did_not() {
        let b = request_usage_chunk(br#"{"stream":true,"messages":[]}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(
            request_usage_chunk(br#"{"stream":true,"stream_options":{"include_usage":true}}"#)
                .is_none()
        );
        assert!(request_usage_chunk(br#"{"messages":[]}"#).is_none());
        assert!(request_usage_chunk(b"not json").is_none());
        // The client's bytes stay as sent, the option added before the closing brace.
        let b = request_usage_chunk(b"{\"stream\": true, \"n\": 1.50}\n").unwrap();
        assert_eq!(
            &b[..],
            b"{\"stream\": true, \"n\": 1.50,\"stream_options\":{\"include_usage\":true}}\n"
        );
        // Options of the client's own keep theirs.
        let b = request_usage_chunk(br#"{"stream":true,"stream_options":{"x":1}}"#).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(
            v["stream_options"],
            serde_json::json!({"x": 1, "include_usage": true})
        );
        for unchanged in [
            &br#"{"stream":true,"stream_options":null}"#[..],
            br#"{"stream":"true"}"#,
            br#"{"stream":false}"#,
            br#"[true]"#,
            br#"{"stream":true} {}"#,
            br#"{"stream":true"#,
        ] {
            assert!(
                request_usage_chunk(unchanged).is_none(),
                "{}",
                String::from_utf8_lossy(unchanged)
            );
        }
        // A repeated key: the last one counts, as in a whole parse.
        assert!(request_usage_chunk(br#"{"stream":false,"stream":true}"#).is_some());
        assert!(request_usage_chunk(br#"{"stream":true,"stream":false}"#).is_none());
    }

    #[test]
    fn reads_responses_usage_from_bodies_and_named_events() {
        let body = br#"{"id":"resp_1","object":"response","output":[],"usage":{"input_tokens":1200,
            "input_tokens_details":{"cached_tokens":1024},"output_tokens":20,
            "output_tokens_details":{"reasoning_tokens":4},"total_tokens":1220},"user":null,"metadata":{}}"#;
        let want = Some(Usage {
            prompt_tokens: 1200,
            completion_tokens: 20,
            total_tokens: 1220,
            cached_tokens: 1024,
            reasoning_tokens: 4,
            audio_tokens: 0,
        });
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        assert_eq!(run(&mut tap, &[body]).1, want);
        let body = std::str::from_utf8(body).unwrap().replace('\n', "");
        let stream = format!(
            "event: response.created\ndata: {{\"type\":\"response.created\",\"response\":{{\"usage\":null}}}}\n\n\
             event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"delta\":\"hi\"}}\n\n\
             event: response.completed\ndata: {{\"type\":\"response.completed\",\"response\":{body}}}\n\n"
        );
        let mut tap = Tap::new(Some("text/event-stream"), false).unwrap();
        let (out, usage) = run(&mut tap, &[stream.as_bytes()]);
        assert_eq!(out, stream.as_bytes());
        assert_eq!(usage, want);
    }

    /// Every token kind, as each operation's answer states it.
    #[test]
    fn reads_every_token_kind_of_every_operation() {
        let u = |s: &str| usage_in(s.as_bytes()).unwrap();
        // Chat with audio in and out (gpt-4o-audio-preview).
        let chat = u(
            r#"{"usage":{"prompt_tokens":30,"completion_tokens":50,"total_tokens":80,
            "prompt_tokens_details":{"cached_tokens":16,"audio_tokens":10},
            "completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":40,
            "accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}}"#,
        );
        assert_eq!(
            (chat.cached_tokens, chat.audio_tokens, chat.reasoning_tokens),
            (16, 50, 0)
        );
        // Audio transcription (gpt-4o-transcribe): `input_token_details`, singular.
        let transcribe = u(r#"{"text":"hi","usage":{"type":"tokens","input_tokens":14,
            "input_token_details":{"text_tokens":0,"audio_tokens":14},"output_tokens":45,"total_tokens":59}}"#);
        assert_eq!(
            (
                transcribe.prompt_tokens,
                transcribe.completion_tokens,
                transcribe.audio_tokens
            ),
            (14, 45, 14)
        );
        // Images (gpt-image-1): text and image input, counted as prompt tokens.
        let image = u(
            r#"{"data":[],"usage":{"total_tokens":100,"input_tokens":50,"output_tokens":50,
            "input_tokens_details":{"text_tokens":10,"image_tokens":40}}}"#,
        );
        assert_eq!(
            (
                image.prompt_tokens,
                image.completion_tokens,
                image.total_tokens
            ),
            (50, 50, 100)
        );
        // Embeddings: prompt tokens only.
        let embed = u(
            r#"{"data":[],"model":"text-embedding-3-large","usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        assert_eq!(
            (embed.prompt_tokens, embed.total_tokens, embed.audio_tokens),
            (8, 8, 0)
        );
    }

    #[test]
    fn the_usage_scan_reads_top_level_counts_only() {
        let u = |s: &str| usage_in(s.as_bytes());
        let full = r#"{"x":"a \"usage\": {","usage" : {"completion_tokens":8,
            "completion_tokens_details":{"reasoning_tokens":3,"total_tokens":99},
            "prompt_tokens": 10 ,"note":"total_tokens\\","prompt_tokens_details":{"cached_tokens":0},
            "total_tokens":18}}"#;
        assert_eq!(
            u(full),
            Some(Usage {
                prompt_tokens: 10,
                completion_tokens: 8,
                total_tokens: 18,
                cached_tokens: 0,
                reasoning_tokens: 3,
                audio_tokens: 0,
            })
        );
        // Embeddings: no completion count; the total is made up when missing.
        assert_eq!(
            u(r#"{"usage":{"prompt_tokens":5}}"#),
            Some(Usage {
                prompt_tokens: 5,
                completion_tokens: 0,
                total_tokens: 5,
                ..Usage::default()
            })
        );
        assert_eq!(u(r#"{"usage":null}"#), None);
        assert_eq!(u(r#"{"usage":{"prompt_tokens":0,"total_tokens":0}}"#), None);
        assert_eq!(u(r#"{"usage":{"prompt_tokens":7,"total_"#), None, "cut off");
        assert_eq!(
            u(r#"{"usage":{"prompt_tokens":7,"x":"}"#),
            None,
            "cut in a string"
        );
    }
}

mod search {
    use crate::usage::{first_event_end, last_event_end, last_usage_key, memfind};

    #[test]
    fn searches_agree_with_the_naive_ones() {
        let naive = |h: &[u8], n: &[u8]| h.windows(n.len()).position(|w| w == n);
        let naive_r = |h: &[u8], n: &[u8]| h.windows(n.len()).rposition(|w| w == n);
        let hays: [&[u8]; 7] = [
            b"",
            b"\"",
            b"\"usage\"",
            b"{\"usage\":1,\"usage\":2}",
            b"\"usag\"usage\"\"usage",
            b"xx\"usage\"",
            b"\"usage\"xx",
        ];
        for h in hays {
            for n in [&b"\"usage\""[..], b"\"", b"x", b"\"usage\":null,"] {
                assert_eq!(memfind(h, n), naive(h, n), "{h:?} {n:?}");
            }
            assert_eq!(last_usage_key(h), naive_r(h, b"\"usage\""), "{h:?}");
        }
    }

    #[test]
    fn event_ends_agree_with_the_pairwise_search() {
        let first = |h: &[u8]| h.windows(2).position(|w| w == b"\n\n").map(|i| i + 2);
        let last = |h: &[u8]| h.windows(2).rposition(|w| w == b"\n\n").map(|i| i + 2);
        // Every string of up to 10 bytes of `\n` and `x`: runs of newlines of every length,
        // at the start, the end and in between.
        for len in 0..=10 {
            for bits in 0u32..1 << len {
                let h: Vec<u8> = (0..len)
                    .map(|i| if bits >> i & 1 == 1 { b'\n' } else { b'x' })
                    .collect();
                assert_eq!(first_event_end(&h), first(&h), "{h:?}");
                assert_eq!(last_event_end(&h), last(&h), "{h:?}");
            }
        }
    }

    #[test]
    fn the_last_key_is_found_among_many_gs() {
        let naive_r = |h: &[u8]| h.windows(7).rposition(|w| w == b"\"usage\"");
        for gs in [0, 1, 63, 64, 65, 200] {
            for at in [0, 1, gs / 2, gs].into_iter().filter(|a| *a <= gs) {
                let mut h = vec![b'g'; gs];
                h.splice(at..at, b"\"usage\"".iter().copied());
                assert_eq!(last_usage_key(&h), naive_r(&h), "{gs} g, key at {at}");
                h.extend_from_slice(b"\"usage");
                assert_eq!(
                    last_usage_key(&h),
                    naive_r(&h),
                    "{gs} g, key at {at}, cut one"
                );
            }
            assert_eq!(last_usage_key(&vec![b'g'; gs]), None);
        }
    }

    #[test]
    fn the_last_key_is_found_wherever_it_is_against_the_tail() {
        let naive_r = |h: &[u8]| h.windows(7).rposition(|w| w == b"\"usage\"");
        // The key before the tail, across its start, inside it, and twice, in bodies around
        // the tail's size.
        for len in [500, 511, 512, 513, 600, 2000] {
            for at in (0..len - 7).filter(|a| a % 97 == 0 || len - a < 530) {
                let mut h = vec![b'x'; len];
                h[at..at + 7].copy_from_slice(b"\"usage\"");
                assert_eq!(last_usage_key(&h), naive_r(&h), "len {len} at {at}");
                if at >= 20 {
                    h[3..10].copy_from_slice(b"\"usage\"");
                    assert_eq!(last_usage_key(&h), naive_r(&h), "len {len} at {at}, twice");
                }
            }
        }
    }
}

mod json_tail {
    use crate::usage::*;

    #[test]
    fn usage_at_the_end_of_a_long_body_in_many_chunks_is_found() {
        let mut body = br#"{"data":["#.to_vec();
        body.extend(std::iter::repeat_n(b'7', 300 * 1024));
        body.extend_from_slice(br#"],"usage":{"prompt_tokens":12,"total_tokens":12}}"#);
        let mut tap = Tap::new(Some("application/json"), false).unwrap();
        let mut out = Vec::new();
        // Chunks of 1,000 bytes: the usage object is cut in two.
        for piece in body.chunks(1000) {
            out.extend_from_slice(&tap.feed(Bytes::copy_from_slice(piece)));
        }
        assert_eq!(out, body, "the client gets the body unchanged");
        let Tap::Json { chunks, len } = &tap else {
            panic!("a JSON tap")
        };
        assert!(*len >= JSON_TAIL && *len < JSON_TAIL + 1000, "{len}");
        assert_eq!(chunks.iter().map(Bytes::len).sum::<usize>(), *len);
        let (_, usage) = tap.finish();
        assert_eq!(usage.map(|u| u.prompt_tokens), Some(12));
    }
}
