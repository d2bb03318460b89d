//! The HTTP API against a real PostgreSQL: every endpoint's success and error paths.

use std::collections::HashSet;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use taskexec_tests::{assert_problem, PgProxy, TestApp, TestDb, TOKEN};

#[tokio::test(flavor = "multi_thread")]
async fn a_created_task_is_queued_located_and_readable() {
    let app = TestApp::spawn().await;

    let response = app
        .request(Method::POST, "/tasks")
        .json(&json!({"command": "echo hi"}))
        .send()
        .await
        .unwrap();

    assert_eq!(response.status(), 201);
    let location = response.headers()["location"].to_str().unwrap().to_owned();
    let task: Value = response.json().await.unwrap();
    assert_eq!(location, format!("/tasks/{}", task["id"].as_str().unwrap()));
    assert_eq!(task["command"], "echo hi");
    assert_eq!(task["status"], "queued");
    assert_eq!(task["attempts"], 0);
    for field in ["started_at", "finished_at", "exit_code", "stdout", "stderr", "error", "agent"] {
        assert!(task[field].is_null(), "{field} is set on a new task");
    }
    assert!(task.get("lease").is_none(), "users must not see the lease");
    let created_at = task["created_at"].as_str().unwrap();
    assert!(created_at.ends_with('Z') && created_at.contains('T'), "RFC 3339: {created_at}");
    assert_eq!(app.task(task["id"].as_str().unwrap()).await, task);
}

#[tokio::test(flavor = "multi_thread")]
async fn each_bad_new_task_gets_a_problem_naming_it() {
    let app = TestApp::spawn().await;
    let too_long = "x".repeat(64 * 1024 + 1);
    let json_cases: Vec<(Value, u16, &str)> = vec![
        (json!({"command": "ls", "status": "finished"}), 422, "`status` is set by the server"),
        (json!({"command": "ls", "id": "x"}), 422, "`id` is set by the server"),
        (json!({"command": "ls", "priority": 3}), 422, "unknown field `priority`"),
        (json!({}), 422, "`command` is required"),
        (json!({"command": ""}), 422, "empty"),
        (json!({"command": "  \n\t "}), 422, "only whitespace"),
        (json!({"command": 42}), 422, "must be a string"),
        (json!({"command": ["ls"]}), 422, "must be a string"),
        (json!({"command": "echo a\u{0}b"}), 422, "NUL"),
        (json!({"command": too_long}), 422, "the limit is 65536"),
        (json!(["ls"]), 422, "JSON object"),
    ];
    for (body, status, needle) in json_cases {
        let response = app.request(Method::POST, "/tasks").json(&body).send().await.unwrap();
        assert_problem(response, status, needle).await;
    }

    let raw_cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("application/json", b"{\"command\": ".to_vec(), 400, "not valid JSON"),
        ("application/json", b"".to_vec(), 400, "not valid JSON"),
        ("application/json", vec![b'"'; 200 * 1024], 413, "larger than"),
        ("text/plain", b"{\"command\": \"ls\"}".to_vec(), 415, "Content-Type: application/json"),
        ("application/x-www-form-urlencoded", b"command=ls".to_vec(), 415, "application/json"),
    ];
    for (content_type, body, status, needle) in raw_cases {
        let response = app
            .request(Method::POST, "/tasks")
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_problem(response, status, needle).await;
    }

    let page: Value = app.get_json("/tasks").await;
    assert_eq!(page["tasks"], json!([]), "a refused task must not be stored");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_at_the_size_limit_is_accepted() {
    let app = TestApp::spawn().await;
    let task = app.create(&"x".repeat(64 * 1024)).await;
    assert_eq!(task["command"].as_str().unwrap().len(), 64 * 1024);
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_and_malformed_task_ids_are_4xx_problems() {
    let app = TestApp::spawn().await;

    let unknown =
        app.request(Method::GET, &format!("/tasks/{}", uuid::Uuid::new_v4())).send().await.unwrap();
    assert_problem(unknown, 404, "no task with id").await;

    let malformed = app.request(Method::GET, "/tasks/not-a-uuid").send().await.unwrap();
    assert_problem(malformed, 400, "not a task id").await;

    let no_route = app.request(Method::GET, "/nowhere").send().await.unwrap();
    assert_problem(no_route, 404, "/nowhere").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_list_is_newest_first_and_filters_by_status() {
    let app = TestApp::spawn().await;
    let first = app.create("echo 1").await;
    let second = app.create("echo 2").await;
    let third = app.create("echo 3").await;
    app.pick("a", 0).await.expect("the first task is picked");

    let page: Value = app.get_json("/tasks").await;
    let ids: Vec<&Value> = page["tasks"].as_array().unwrap().iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, vec![&third["id"], &second["id"], &first["id"]]);
    assert!(page["next"].is_null());

    let queued: Value = app.get_json("/tasks?status=queued").await;
    let ids: Vec<&Value> = queued["tasks"].as_array().unwrap().iter().map(|t| &t["id"]).collect();
    assert_eq!(ids, vec![&third["id"], &second["id"]]);

    let running: Value = app.get_json("/tasks?status=in_progress").await;
    assert_eq!(running["tasks"][0]["id"], first["id"]);
    assert_eq!(running["tasks"].as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn walking_all_pages_sees_each_task_exactly_once_while_tasks_arrive() {
    let app = TestApp::spawn().await;
    let mut created = HashSet::new();
    for i in 0..23 {
        created.insert(app.create(&format!("echo {i}")).await["id"].as_str().unwrap().to_owned());
    }

    let mut seen = Vec::new();
    let mut path = "/tasks?limit=5".to_owned();
    loop {
        let page: Value =
            app.request(Method::GET, &path).send().await.unwrap().json().await.unwrap();
        let tasks = page["tasks"].as_array().unwrap();
        assert!(tasks.len() <= 5);
        seen.extend(tasks.iter().map(|t| t["id"].as_str().unwrap().to_owned()));
        // Newer tasks arriving mid-walk must neither shift nor repeat the older pages.
        app.create("echo newcomer").await;
        match page["next"].as_str() {
            Some(cursor) => path = format!("/tasks?limit=5&cursor={cursor}"),
            None => break,
        }
    }

    assert_eq!(seen.len(), 23, "each task once: {seen:?}");
    assert_eq!(seen.iter().cloned().collect::<HashSet<_>>(), created);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_list_parameters_are_400_problems() {
    let app = TestApp::spawn().await;
    let cases = [
        ("/tasks?status=done", "unknown status"),
        ("/tasks?limit=0", "from 1 to 1000"),
        ("/tasks?limit=1001", "from 1 to 1000"),
        ("/tasks?limit=ten", "from 1 to 1000"),
        ("/tasks?cursor=zzz", "not a cursor"),
        ("/tasks?cursor=s-1", "not a cursor"),
    ];
    for (path, needle) in cases {
        let response = app.request(Method::GET, path).send().await.unwrap();
        assert_problem(response, 400, needle).await;
    }
    let max = app.request(Method::GET, "/tasks?limit=1000").send().await.unwrap();
    assert_eq!(max.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_endpoints_require_the_token_and_a_name() {
    let app = TestApp::spawn().await;
    let task = app.create("true").await;
    let id = task["id"].as_str().unwrap();

    let none = app
        .request(Method::GET, "/tasks/pick?wait=0")
        .header("X-Agent-Name", "a")
        .send()
        .await
        .unwrap();
    assert_eq!(none.headers()["www-authenticate"], "Bearer");
    assert_problem(none, 401, "Bearer").await;

    let wrong = app
        .request(Method::GET, "/tasks/pick?wait=0")
        .bearer_auth("not-the-token")
        .header("X-Agent-Name", "a")
        .send()
        .await
        .unwrap();
    assert_problem(wrong, 401, "token").await;

    let unnamed =
        app.request(Method::GET, "/tasks/pick?wait=0").bearer_auth(TOKEN).send().await.unwrap();
    assert_problem(unnamed, 400, "X-Agent-Name").await;

    let finish = app
        .request(Method::POST, &format!("/tasks/{id}/finish"))
        .json(&json!({"lease": uuid::Uuid::new_v4(), "exit_code": 0}))
        .send()
        .await
        .unwrap();
    assert_problem(finish, 401, "token").await;

    assert_eq!(app.task(id).await["status"], "queued", "refused requests change nothing");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pick_hands_out_the_oldest_task_with_a_lease() {
    let app = TestApp::spawn().await;
    let oldest = app.create("echo first").await;
    app.create("echo second").await;

    let picked = app.pick("agent-7", 0).await.expect("a task");

    assert_eq!(picked["id"], oldest["id"]);
    assert_eq!(picked["command"], "echo first");
    assert_eq!(picked["attempts"], 1);
    assert!(uuid::Uuid::parse_str(picked["lease"].as_str().unwrap()).is_ok());
    let stored = app.task(oldest["id"].as_str().unwrap()).await;
    assert_eq!(stored["status"], "in_progress");
    assert_eq!(stored["agent"], "agent-7");
    assert!(stored["started_at"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn sequential_picks_follow_creation_order() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..20 {
        created.push(app.create(&format!("echo {i}")).await["id"].clone());
    }

    let mut picked = Vec::new();
    while let Some(task) = app.pick("agent", 0).await {
        picked.push(task["id"].clone());
    }

    assert_eq!(picked, created);
}

#[tokio::test(flavor = "multi_thread")]
async fn thirty_two_concurrent_pickers_get_each_of_500_tasks_exactly_once() {
    let app = TestApp::spawn().await;
    for i in 0..500 {
        app.create(&format!("echo {i}")).await;
    }

    let pickers: Vec<_> = (0..32)
        .map(|n| {
            let (url, http) = (app.url.clone(), app.http.clone());
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let response = http
                        .get(format!("{url}/tasks/pick?wait=0"))
                        .bearer_auth(TOKEN)
                        .header("X-Agent-Name", format!("picker-{n}"))
                        .send()
                        .await
                        .unwrap();
                    if response.status() == 204 {
                        return mine;
                    }
                    assert_eq!(response.status(), 200);
                    let task: Value = response.json().await.unwrap();
                    mine.push(task["id"].as_str().unwrap().to_owned());
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for picker in pickers {
        all.extend(picker.await.unwrap());
    }

    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 500, "every task picked");
    assert_eq!(distinct.len(), 500, "no task picked twice");
    let left: Value = app.get_json("/tasks?status=queued").await;
    assert_eq!(left["tasks"], json!([]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_pick_wakes_when_a_task_is_created() {
    let app = TestApp::spawn().await;
    let started = tokio::time::Instant::now();
    let pick = {
        let (url, http) = (app.url.clone(), app.http.clone());
        tokio::spawn(async move {
            http.get(format!("{url}/tasks/pick?wait=20"))
                .bearer_auth(TOKEN)
                .header("X-Agent-Name", "parked")
                .send()
                .await
                .unwrap()
        })
    };
    app.until_parked(1).await;

    let task = app.create("echo wake").await;

    let response = pick.await.unwrap();
    assert_eq!(response.status(), 200);
    let picked: Value = response.json().await.unwrap();
    assert_eq!(picked["id"], task["id"]);
    assert!(started.elapsed() < Duration::from_secs(10), "woken long before the 20 s deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_task_created_on_another_api_process_wakes_a_parked_pick() {
    let app = TestApp::spawn().await;
    let peer = app.spawn_peer().await;
    let pick = {
        let (url, http) = (app.url.clone(), app.http.clone());
        tokio::spawn(async move {
            http.get(format!("{url}/tasks/pick?wait=20"))
                .bearer_auth(TOKEN)
                .header("X-Agent-Name", "parked")
                .send()
                .await
                .unwrap()
        })
    };
    app.until_parked(1).await;

    let task = peer.create("echo from the peer").await;

    let response = pick.await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["id"], task["id"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parked_pick_answers_204_at_its_deadline() {
    let app = TestApp::spawn().await;
    let started = tokio::time::Instant::now();

    let picked = app.pick("patient", 1).await;

    assert!(picked.is_none());
    assert!(started.elapsed() >= Duration::from_secs(1), "held until the deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_beyond_the_maximum_is_refused() {
    let app = TestApp::spawn().await;
    for wait in ["61", "-1", "soon"] {
        let response =
            app.agent(Method::GET, &format!("/tasks/pick?wait={wait}"), "a").send().await.unwrap();
        assert_problem(response, 400, "`wait` must be").await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn shutting_the_api_down_ends_parked_picks_with_204() {
    let app = TestApp::spawn().await;
    let pick = {
        let (url, http) = (app.url.clone(), app.http.clone());
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            let response = http
                .get(format!("{url}/tasks/pick?wait=60"))
                .bearer_auth(TOKEN)
                .header("X-Agent-Name", "parked")
                .send()
                .await
                .unwrap();
            (response.status(), started.elapsed())
        })
    };
    app.until_parked(1).await;

    app.shutdown_handle().notify();

    let (status, waited) = pick.await.unwrap();
    assert_eq!(status, 204);
    assert!(waited < Duration::from_secs(10), "ended by the shutdown, not the 60 s deadline");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_records_an_exit_code_or_an_error() {
    let app = TestApp::spawn().await;
    app.create("echo ok").await;
    app.create("kill -9 $$").await;
    let ran = app.pick("a", 0).await.unwrap();
    let killed = app.pick("a", 0).await.unwrap();

    let finished = app
        .finish(
            ran["id"].as_str().unwrap(),
            json!({"lease": ran["lease"], "exit_code": 0, "stdout": "ok\n", "stderr": "", "error": null}),
        )
        .await;
    let failed = app
        .finish(
            killed["id"].as_str().unwrap(),
            json!({"lease": killed["lease"], "exit_code": null, "stdout": "", "stderr": "", "error": "killed by signal 9 (SIGKILL)"}),
        )
        .await;

    assert_eq!(finished.status(), 200);
    let finished: Value = finished.json().await.unwrap();
    assert_eq!(finished["status"], "finished");
    assert_eq!(finished["exit_code"], 0);
    assert_eq!(finished["stdout"], "ok\n");
    assert_eq!(finished["agent"], "a");
    assert!(finished["finished_at"].is_string());
    assert_eq!(failed.status(), 200);
    let failed: Value = failed.json().await.unwrap();
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"], "killed by signal 9 (SIGKILL)");
    assert!(failed["exit_code"].is_null());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_with_another_lease_is_409_and_changes_nothing() {
    let app = TestApp::spawn().await;
    app.create("echo x").await;
    let picked = app.pick("a", 0).await.unwrap();
    let id = picked["id"].as_str().unwrap();

    let response = app.finish(id, json!({"lease": uuid::Uuid::new_v4(), "exit_code": 0})).await;

    assert_problem(response, 409, "another attempt").await;
    assert_eq!(app.task(id).await["status"], "in_progress");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_finish_of_a_task_not_in_progress_is_409() {
    let app = TestApp::spawn().await;
    let queued = app.create("echo x").await;

    let response = app
        .finish(
            queued["id"].as_str().unwrap(),
            json!({"lease": uuid::Uuid::new_v4(), "exit_code": 0}),
        )
        .await;

    assert_problem(response, 409, "").await;
    assert_eq!(app.task(queued["id"].as_str().unwrap()).await["status"], "queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_finish_answers_200_and_is_recorded_once() {
    let app = TestApp::spawn().await;
    app.create("echo x").await;
    let picked = app.pick("a", 0).await.unwrap();
    let id = picked["id"].as_str().unwrap();
    let report = json!({"lease": picked["lease"], "exit_code": 0, "stdout": "x\n"});
    let first: Value = app.finish(id, report.clone()).await.json().await.unwrap();

    let again = app.finish(id, report).await;

    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again, first, "the same record, not a second write");
    let different = app.finish(id, json!({"lease": picked["lease"], "exit_code": 1})).await;
    assert_problem(different, 409, "different result").await;
    assert_eq!(app.task(id).await["exit_code"], 0, "the first report stands");
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_finish_reports_are_refused_without_effect() {
    let app = TestApp::spawn().await;
    app.create("echo x").await;
    let picked = app.pick("a", 0).await.unwrap();
    let id = picked["id"].as_str().unwrap();
    let lease = picked["lease"].clone();
    let cases = [
        (json!({"lease": lease, "exit_code": 256}), "between 0 and 255"),
        (json!({"lease": lease, "exit_code": -1}), "between 0 and 255"),
        (json!({"lease": lease}), "give `exit_code`"),
        (json!({"lease": lease, "exit_code": 0, "error": "both"}), "not both"),
        (json!({"lease": lease, "exit_code": 0, "stdout": "a\u{0}b"}), "NUL"),
        (json!({"lease": "not-a-uuid", "exit_code": 0}), "UUID"),
        (json!({"exit_code": 0}), "lease"),
        (json!({"lease": lease, "exit_code": "0"}), "invalid type"),
    ];
    for (body, needle) in cases {
        assert_problem(app.finish(id, body).await, 422, needle).await;
    }
    let unknown = app
        .finish(&uuid::Uuid::new_v4().to_string(), json!({"lease": lease, "exit_code": 0}))
        .await;
    assert_problem(unknown, 404, "no task").await;
    assert_eq!(app.task(id).await["status"], "in_progress");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_names_the_service_and_health_checks_the_database() {
    let app = TestApp::spawn().await;

    let root: Value = app.get_json("/").await;
    let health = app.request(Method::GET, "/health").send().await.unwrap();

    assert_eq!(root["service"], "taskexec-api");
    assert!(root["version"].is_string());
    assert_eq!(health.status(), 200);
    assert_eq!(health.json::<Value>().await.unwrap()["database"], "ok");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_answers_503_while_the_database_is_gone_and_recovers_by_itself() {
    let db = std::sync::Arc::new(TestDb::create().await);
    let proxy = PgProxy::start(&db).await;
    let url = proxy.url.clone();
    let app = TestApp::spawn_on(db, move |figment| {
        figment.merge((taskexec_api::config::DATABASE_URL_KEY, url))
    })
    .await;
    proxy.cut();

    let started = tokio::time::Instant::now();
    let health = app.request(Method::GET, "/health").send().await.unwrap();
    let create =
        app.request(Method::POST, "/tasks").json(&json!({"command": "ls"})).send().await.unwrap();
    let list = app.request(Method::GET, "/tasks").send().await.unwrap();

    assert_problem(health, 503, "database").await;
    assert_problem(create, 503, "database").await;
    assert_problem(list, 503, "database").await;
    assert!(started.elapsed() < Duration::from_secs(15), "503s come within seconds, not a hang");
    proxy.restore();
    app.eventually(|health: Value| health["status"] == "ok", "/health").await;
    assert_eq!(app.create("echo back").await["status"], "queued");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_server_refuses_to_start_without_an_agent_token() {
    let db = TestDb::create().await;

    let output = tokio::process::Command::new(taskexec_tests::binary("taskexec-api"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("SERVER_PORT", "0")
        .output()
        .await
        .unwrap();

    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AGENT_TOKEN is not set"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_to_the_server_ends_parked_picks_with_204_and_exits_0() {
    let db = TestDb::create().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut server = tokio::process::Command::new(taskexec_tests::binary("taskexec-api"))
        .env_clear()
        .env("DATABASE_URL", &db.url)
        .env("AGENT_TOKEN", TOKEN)
        .env("SERVER_PORT", port.to_string())
        .env("LOG_LEVEL", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/health")).send().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pick = tokio::spawn({
        let (url, http) = (url.clone(), http.clone());
        async move {
            let response = http
                .get(format!("{url}/tasks/pick?wait=60"))
                .bearer_auth(TOKEN)
                .header("X-Agent-Name", "parked")
                .send()
                .await
                .unwrap();
            response.status()
        }
    });
    loop {
        let health: Value =
            http.get(format!("{url}/health")).send().await.unwrap().json().await.unwrap();
        if health["parked_picks"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // SAFETY: signals our own child.
    unsafe { libc::kill(server.id().unwrap() as i32, libc::SIGTERM) };

    let status =
        tokio::time::timeout(Duration::from_secs(10), pick).await.expect("the pick ends promptly");
    assert_eq!(status.unwrap(), 204);
    let exit = tokio::time::timeout(Duration::from_secs(10), server.wait())
        .await
        .expect("the server exits");
    assert!(exit.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_submissions_are_each_stored_once_with_their_own_command() {
    let app = TestApp::spawn().await;

    let creates: Vec<_> = (0..200)
        .map(|n| {
            let (url, http) = (app.url.clone(), app.http.clone());
            tokio::spawn(async move {
                let response = http
                    .post(format!("{url}/tasks"))
                    .json(&json!({"command": format!("echo {n}"), "timeout_secs": n + 1}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                (n, response.json::<Value>().await.unwrap())
            })
        })
        .collect();
    let mut ids = HashSet::new();
    for create in creates {
        let (n, task) = create.await.unwrap();
        assert_eq!(task["command"], format!("echo {n}"));
        assert_eq!(task["timeout_secs"], n + 1);
        assert!(ids.insert(task["id"].as_str().unwrap().to_owned()));
        assert_eq!(app.task(task["id"].as_str().unwrap()).await, task, "stored as answered");
    }

    let page: Value = app.get_json("/tasks?limit=1000").await;
    assert_eq!(page["tasks"].as_array().unwrap().len(), 200);
}
