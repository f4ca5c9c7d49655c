//! Object ids found in paths, bodies, forms and answers; merged list pages.

use super::*;

#[test]
fn paths_name_their_top_level_object_on_every_surface() {
    for (path, collection, id, exact) in [
        ("/openai/files/file-1", "files", Some("file-1"), true),
        ("/openai/files/%66ile-1", "files", Some("file-1"), true),
        (
            "/openai/files/file-1/content?api-version=x",
            "files",
            Some("file-1"),
            false,
        ),
        (
            "/openai/v1/responses/resp_1",
            "responses",
            Some("resp_1"),
            true,
        ),
        (
            "/openai/v1/responses/resp_1/input_items",
            "responses",
            Some("resp_1"),
            false,
        ),
        ("/openai/batches?api-version=x", "batches", None, false),
        (
            "/openai/threads/thread_1/runs/run_2",
            "threads",
            Some("thread_1"),
            false,
        ),
        (
            "/openai/v1/fine_tuning/jobs/ftjob-1/events",
            "fine_tuning/jobs",
            Some("ftjob-1"),
            false,
        ),
        (
            "/openai/v1/chat/completions/chatcmpl-1",
            "chat/completions",
            Some("chatcmpl-1"),
            true,
        ),
        (
            "/openai/deployments/gpt/chat/completions/chatcmpl-1",
            "chat/completions",
            Some("chatcmpl-1"),
            true,
        ),
        (
            "/openai/v1/vector_stores/vs_1/files",
            "vector_stores",
            Some("vs_1"),
            false,
        ),
    ] {
        assert_eq!(
            path_object(path),
            Some(PathObject {
                collection,
                id: id.map(Cow::Borrowed),
                exact
            }),
            "{path}"
        );
    }
    assert_eq!(
        path_object("/openai/v1/chat/completions").map(|p| p.id),
        Some(None)
    );
    assert_eq!(path_object("/openai/v1/embeddings"), None);
    assert_eq!(path_object("/openai/deployments/gpt/embeddings"), None);
    assert_eq!(path_object("/openai/v1/filesystem/x"), None);
    assert_eq!(
        path_object("/v1/files/x"),
        None,
        "the backend-bound path is read"
    );
}

#[test]
fn merged_lists_page_across_backends() {
    let items: Vec<Value> = (0..5)
        .map(|i| serde_json::json!({"id": format!("batch_{i}"), "created_at": 100 + i}))
        .collect();
    let page = merge_page("batches", "limit=2", items.clone());
    assert_eq!(page["data"][0]["id"], "batch_4");
    assert_eq!(page["last_id"], "batch_3");
    assert_eq!(page["has_more"], true);
    let page = merge_page("batches", "limit=2&after=batch_3", items.clone());
    assert_eq!(page["first_id"], "batch_2");
    assert_eq!(page["has_more"], true);
    let page = merge_page("batches", "after=batch_1&api-version=x", items.clone());
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["has_more"], false);
    let page = merge_page("batches", "order=asc&limit=1", items);
    assert_eq!(page["first_id"], "batch_0");
}

#[test]
fn bodies_name_objects_at_any_depth() {
    let body = br#"{"model":"m","previous_response_id":"resp_1","conversation":{"id":"conv_1"},
        "tools":[{"type":"file_search","vector_store_ids":["vs_1","vs_2"]}],
        "input":[{"type":"reasoning","id":"rs_1","encrypted_content":"abc","summary":[]},
                 {"type":"reasoning","id":"rs_2","summary":[]},
                 {"role":"user","content":[{"type":"input_file","file_id":"file-9"}]}]}"#;
    let mut ids = body_ids(body, true);
    ids.sort();
    assert_eq!(ids, ["conv_1", "file-9", "resp_1", "rs_1", "vs_1", "vs_2"]);
    assert_eq!(
        body_ids(
            br#"{"input_file_id":"file-1","endpoint":"/v1/chat/completions"}"#,
            false
        ),
        ["file-1"]
    );
    let mut ids = body_ids(
        br#"{"validation_file":"file-b","training_file":"file-a"}"#,
        false,
    );
    ids.sort();
    assert_eq!(ids, ["file-a", "file-b"]);
    assert!(body_ids(br#"{"messages":[{"role":"user","content":"hi"}]}"#, false).is_empty());
    assert!(body_ids(b"not json _id", false).is_empty());
    // Keys written with escapes are read as what they say.
    assert_eq!(body_ids(br#"{"file\u005fid":"file-3"}"#, false), ["file-3"]);
    assert_eq!(
        body_ids(br#"{"input":[],"conversation":"conv_2"}"#, true),
        ["conv_2"]
    );
    assert!(body_refs(br#"{"store":true,"messages":[]}"#, false, true).stored);
    // A repeated key, written plainly or with escapes, is found.
    let twice = br#"{"input":[{"file_id":"file-a","file\u005fid":"file-b"}]}"#;
    assert_eq!(
        body_refs(twice, false, false).repeated.as_deref(),
        Some("file_id")
    );
    let twice = br#"{"previous_response_id":"a","previous_response_id":"b"}"#;
    assert_eq!(
        body_refs(twice, true, false).repeated.as_deref(),
        Some("previous_response_id")
    );
    assert_eq!(
        body_refs(
            br#"{"a":{"file_id":"x"},"b":{"file_id":"y"}}"#,
            false,
            false
        )
        .repeated,
        None
    );
    assert!(!body_refs(br#"{"store":true,"input":"x"}"#, false, false).stored);
    assert!(!body_refs(br#"{"store":false,"messages":[]}"#, false, true).stored);
    assert!(
        !body_refs(
            br#"{"messages":[{"content":"\"store\": true"}]}"#,
            false,
            true
        )
        .stored
    );
    assert!(!may_name_objects(
        br#"{"max_tokens":5,"tool_choice":"auto","content":"caf\u00e9"}"#,
        false
    ));
}

#[tokio::test]
async fn form_fields_name_objects_too() {
    let body = "--b\r\nContent-Disposition: form-data; name=\"file_id\"\r\n\r\nfile-7\r\n\
        --b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.txt\"\r\n\r\nfile_id\r\n\
        --b\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n--b--\r\n";
    let ids = form_ids("multipart/form-data; boundary=b", bytes::Bytes::from(body)).await;
    assert_eq!(ids, ["file-7"]);
}

#[test]
fn answers_make_their_objects_known() {
    let v: Value = serde_json::from_str(
        r#"{"id":"batch_1","object":"batch","input_file_id":"file-1","output_file_id":"file-2","error_file_id":null}"#,
    )
    .unwrap();
    let mut out = Vec::new();
    answer_ids(&v, &mut out);
    assert_eq!(out, ["batch_1", "file-2", "file-1"]);
    let v: Value = serde_json::from_str(
        r#"{"id":"resp_1","object":"response","output":[{"type":"reasoning","id":"rs_1"},{"type":"message","id":"msg_1"}]}"#,
    )
    .unwrap();
    out.clear();
    answer_ids(&v, &mut out);
    assert_eq!(out, ["resp_1", "rs_1"]);
    let v: Value =
        serde_json::from_str(r#"{"object":"list","data":[{"id":"file-1"},{"id":"file-2"}]}"#)
            .unwrap();
    out.clear();
    answer_ids(&v, &mut out);
    assert_eq!(out, ["file-1", "file-2"]);
}

#[test]
fn stream_events_make_the_response_known_from_its_first_event() {
    let mut out = Vec::new();
    event_ids(
        b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"id\":\"resp_1\",\"output\":[]}}\n\n",
        &mut out,
    );
    event_ids(
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"item_id\":\"msg_1\"}\n\n",
        &mut out,
    );
    event_ids(
        b"event: response.output_item.done\ndata: {\"type\":\"response.output_item.done\",\"item\":{\"type\":\"reasoning\",\"id\":\"rs_1\"}}\n\n",
        &mut out,
    );
    assert_eq!(out, ["resp_1", "rs_1"]);
    let mut out = Vec::new();
    event_ids(
        b"data: {\"id\":\"chatcmpl-7\",\"object\":\"chat.completion.chunk\",\"choices\":[]}\n\n",
        &mut out,
    );
    assert_eq!(out, ["chatcmpl-7"]);
}
