//! A typed client of the API, one method per endpoint, in the protocol's own types: what the
//! tests and the benchmark speak. Every method answers the endpoint's success type, or a
//! [`Failure`] with the status and the problem the server sent.

use std::time::Duration;

use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;
use taskexec_protocol::output::headers;
use taskexec_protocol::{
    AgentInfo, Assignment, Attempt, CreatedToken, FinishReport, HeartbeatReply, LeaseBody,
    LeaseToken, NewTask, NewToken, OutputAck, Problem, ProblemType, Role, Stream, Task, TaskId,
    TaskPage, TokenId, TokenInfo,
};

/// A non-success answer: its status and its problem (empty if the body was not one).
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub problem: Problem,
}

impl Failure {
    /// The kind of problem, when the server named a known one.
    pub fn kind(&self) -> Option<ProblemType> {
        self.problem.problem_type()
    }

    /// Asserts the status and that the detail mentions `needle`.
    pub fn expect(&self, status: u16, needle: &str) {
        assert_eq!(self.status, status, "status of {:?}", self.problem);
        let detail = &self.problem.detail;
        assert!(detail.contains(needle), "detail {detail:?} does not mention {needle:?}");
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {}: {}", self.status, self.problem.detail)
    }
}

pub type Answer<T> = Result<T, Failure>;

/// The answer to an abort: cancelled at once (200) or requested of the agent (202).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Aborted {
    Cancelled(Task),
    Requested(Task),
}

/// A read of one stream by offset: the raw bytes and the position headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRead {
    pub data: Vec<u8>,
    pub next_offset: u64,
    pub dropped: u64,
    pub total: u64,
    pub ended: bool,
}

/// The API at `base`: the user's endpoints with one token, the agent's with another.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
    user_token: String,
    agent_token: String,
}

impl Api {
    /// A client that calls the user's endpoints with `user_token` and the agent's with
    /// `agent_token`.
    pub fn new(base: &str, user_token: &str, agent_token: &str) -> Api {
        let http = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
        Api::with_http(base, user_token, agent_token, http)
    }

    /// A client on an HTTP client of the caller's (connection pooling of its own).
    pub fn with_http(
        base: &str,
        user_token: &str,
        agent_token: &str,
        http: reqwest::Client,
    ) -> Api {
        let (user_token, agent_token) = (user_token.to_owned(), agent_token.to_owned());
        Api { base: base.to_owned(), http, user_token, agent_token }
    }

    /// The same API, calling the user's endpoints with `token`.
    pub fn as_user(&self, token: &str) -> Api {
        Api { user_token: token.to_owned(), ..self.clone() }
    }

    /// The same API, calling the agent's endpoints with `token`.
    pub fn as_agent(&self, token: &str) -> Api {
        Api { agent_token: token.to_owned(), ..self.clone() }
    }

    /// A raw request with the user's token, for what the typed methods cannot say (malformed
    /// bodies, odd headers).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.anonymous(method, path).bearer_auth(&self.user_token)
    }

    /// A raw request without any token.
    pub fn anonymous(&self, method: Method, path: &str) -> RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base))
    }

    /// A raw request with the agent's credentials and name.
    pub fn agent(&self, method: Method, path: &str, name: &str) -> RequestBuilder {
        self.anonymous(method, path)
            .bearer_auth(&self.agent_token)
            .header(headers::AGENT_NAME, name)
    }

    // The user's endpoints.

    /// `POST /tasks`.
    pub async fn create(&self, task: &NewTask) -> Answer<Task> {
        let response = self.request(Method::POST, "/tasks").json(task).send().await.unwrap();
        expect_json(response, StatusCode::CREATED).await
    }

    /// `POST /tasks` with an `Idempotency-Key`: the task, and whether this request created it
    /// (201) or found it created by an earlier one with the same key (200).
    pub async fn create_keyed(&self, task: &NewTask, key: &str) -> Answer<(Task, bool)> {
        let response = self
            .request(Method::POST, "/tasks")
            .header(headers::IDEMPOTENCY_KEY, key)
            .json(task)
            .send()
            .await
            .unwrap();
        match response.status() {
            StatusCode::CREATED => Ok((response.json().await.unwrap(), true)),
            StatusCode::OK => Ok((response.json().await.unwrap(), false)),
            _ => Err(failure(response).await),
        }
    }

    /// `POST /tasks` of a command with the defaults; panics unless it is created.
    pub async fn submit(&self, command: &str) -> Task {
        self.create(&NewTask::new(command))
            .await
            .unwrap_or_else(|e| panic!("create {command:?}: {e}"))
    }

    /// `GET /tasks/<id>`.
    pub async fn get(&self, id: TaskId) -> Answer<Task> {
        self.get_json(&format!("/tasks/{id}")).await
    }

    /// `GET /tasks/<id>?wait=S`: the task once it has ended, or after `secs`.
    pub async fn wait(&self, id: TaskId, secs: u64) -> Answer<Task> {
        self.get_json(&format!("/tasks/{id}?wait={secs}")).await
    }

    /// `GET /tasks?<query>` (`query` without the `?`, empty for none).
    pub async fn list(&self, query: &str) -> Answer<TaskPage> {
        let path = if query.is_empty() { "/tasks".to_owned() } else { format!("/tasks?{query}") };
        self.get_json(&path).await
    }

    /// `GET /tasks/<id>/attempts`.
    pub async fn attempts(&self, id: TaskId) -> Answer<Vec<Attempt>> {
        self.get_json(&format!("/tasks/{id}/attempts")).await
    }

    /// `POST /tasks/<id>/abort`.
    pub async fn abort(&self, id: TaskId) -> Answer<Aborted> {
        let path = format!("/tasks/{id}/abort");
        let response = self.request(Method::POST, &path).send().await.unwrap();
        match response.status() {
            StatusCode::OK => Ok(Aborted::Cancelled(response.json().await.unwrap())),
            StatusCode::ACCEPTED => Ok(Aborted::Requested(response.json().await.unwrap())),
            _ => Err(failure(response).await),
        }
    }

    /// `GET /tasks/<id>/output?stream&offset&wait`.
    pub async fn output(
        &self,
        id: TaskId,
        stream: Stream,
        offset: u64,
        wait: u64,
    ) -> Answer<OutputRead> {
        let path = format!("/tasks/{id}/output?stream={stream}&offset={offset}&wait={wait}");
        let response = self.request(Method::GET, &path).send().await.unwrap();
        if response.status() != StatusCode::OK {
            return Err(failure(response).await);
        }
        let header =
            |name: &str| -> String { response.headers()[name].to_str().unwrap().to_owned() };
        let (next_offset, dropped, total, ended) = (
            header(headers::NEXT_OFFSET).parse().unwrap(),
            header(headers::DROPPED).parse().unwrap(),
            header(headers::TOTAL).parse().unwrap(),
            header(headers::ENDED) == "true",
        );
        let data = response.bytes().await.unwrap().to_vec();
        Ok(OutputRead { data, next_offset, dropped, total, ended })
    }

    /// Every byte of one stream, read by offset until the task has ended.
    pub async fn output_all(&self, id: TaskId, stream: Stream) -> Vec<u8> {
        let mut all = Vec::new();
        let mut offset = 0;
        loop {
            let read = self.output(id, stream, offset, 5).await.unwrap();
            all.extend_from_slice(&read.data);
            offset = read.next_offset;
            if read.ended {
                return all;
            }
        }
    }

    /// `GET /tasks/<id>/log?follow=…`: the whole body.
    pub async fn log(&self, id: TaskId, follow: bool) -> Answer<Vec<u8>> {
        let path = format!("/tasks/{id}/log?follow={follow}");
        let response = self.request(Method::GET, &path).send().await.unwrap();
        if response.status() != StatusCode::OK {
            return Err(failure(response).await);
        }
        Ok(response.bytes().await.unwrap().to_vec())
    }

    /// `GET /agents`.
    pub async fn agents(&self) -> Answer<Vec<AgentInfo>> {
        self.get_json("/agents").await
    }

    /// `GET /health`.
    pub async fn health(&self) -> Answer<Value> {
        self.get_json("/health").await
    }

    // Tokens, for an admin.

    /// `POST /tokens`.
    pub async fn create_token(&self, token: &NewToken) -> Answer<CreatedToken> {
        let response = self.request(Method::POST, "/tokens").json(token).send().await.unwrap();
        expect_json(response, StatusCode::CREATED).await
    }

    /// A new token of `role` named `name`, its secret; panics unless it is created.
    pub async fn token(&self, name: &str, role: Role) -> String {
        let new = NewToken { name: name.into(), role, expires_in_secs: None, agent_name: None };
        self.create_token(&new).await.unwrap_or_else(|e| panic!("token {name}: {e}")).token
    }

    /// `GET /tokens`.
    pub async fn tokens(&self) -> Answer<Vec<TokenInfo>> {
        self.get_json("/tokens").await
    }

    /// `DELETE /tokens/<id>`.
    pub async fn revoke_token(&self, id: TokenId) -> Answer<()> {
        let path = format!("/tokens/{id}");
        let response = self.request(Method::DELETE, &path).send().await.unwrap();
        match response.status() {
            StatusCode::NO_CONTENT => Ok(()),
            _ => Err(failure(response).await),
        }
    }

    // The agent's endpoints, each with the agent token.

    /// `GET /tasks/pick?wait=S` as agent `name`: the assignment, or `None` (204).
    pub async fn pick(&self, name: &str, wait: u64) -> Answer<Option<Assignment>> {
        self.pick_tagged(name, "", wait).await
    }

    /// `GET /tasks/pick?wait=S&tags=T` as agent `name` with tags `tags` (`linux,gpu`).
    pub async fn pick_tagged(
        &self,
        name: &str,
        tags: &str,
        wait: u64,
    ) -> Answer<Option<Assignment>> {
        let path = if tags.is_empty() {
            format!("/tasks/pick?wait={wait}")
        } else {
            format!("/tasks/pick?wait={wait}&tags={tags}")
        };
        let response = self.agent(Method::GET, &path, name).send().await.unwrap();
        match response.status() {
            StatusCode::OK => Ok(Some(response.json().await.unwrap())),
            StatusCode::NO_CONTENT => Ok(None),
            _ => Err(failure(response).await),
        }
    }

    /// `GET /tasks/pick?wait=S&max=N` as agent `name`: up to `max` tasks, as a list.
    pub async fn pick_many(&self, name: &str, max: usize, wait: u64) -> Answer<Vec<Assignment>> {
        let path = format!("/tasks/pick?wait={wait}&max={max}");
        let response = self.agent(Method::GET, &path, name).send().await.unwrap();
        match response.status() {
            StatusCode::OK => Ok(response.json().await.unwrap()),
            StatusCode::NO_CONTENT => Ok(Vec::new()),
            _ => Err(failure(response).await),
        }
    }

    /// `POST /tasks/<id>/heartbeat?wait=S`.
    pub async fn heartbeat(
        &self,
        id: TaskId,
        lease: LeaseToken,
        wait: u64,
    ) -> Answer<HeartbeatReply> {
        let path = format!("/tasks/{id}/heartbeat?wait={wait}");
        let request = self.agent(Method::POST, &path, "tester").json(&LeaseBody { lease });
        expect_json(request.send().await.unwrap(), StatusCode::OK).await
    }

    /// `POST /tasks/<id>/finish`.
    pub async fn finish(&self, id: TaskId, report: &FinishReport) -> Answer<Task> {
        let path = format!("/tasks/{id}/finish");
        let request = self.agent(Method::POST, &path, "tester").json(report);
        expect_json(request.send().await.unwrap(), StatusCode::OK).await
    }

    /// `POST /tasks/<id>/release`.
    pub async fn release(&self, id: TaskId, lease: LeaseToken) -> Answer<Task> {
        let path = format!("/tasks/{id}/release");
        let request = self.agent(Method::POST, &path, "tester").json(&LeaseBody { lease });
        expect_json(request.send().await.unwrap(), StatusCode::OK).await
    }

    /// `POST /tasks/<id>/release` of a task whose command the agent says it never started.
    pub async fn release_unstarted(&self, id: TaskId, lease: LeaseToken) -> Answer<Task> {
        let path = format!("/tasks/{id}/release");
        let body = taskexec_protocol::ReleaseBody { lease, unstarted: true };
        let request = self.agent(Method::POST, &path, "tester").json(&body);
        expect_json(request.send().await.unwrap(), StatusCode::OK).await
    }

    /// `POST /tasks/<id>/output?stream&offset&skip` with the raw bytes.
    pub async fn upload(
        &self,
        id: TaskId,
        lease: LeaseToken,
        stream: Stream,
        offset: u64,
        skip: bool,
        data: &[u8],
    ) -> Answer<OutputAck> {
        let path = format!("/tasks/{id}/output?stream={stream}&offset={offset}&skip={skip}");
        let request = self
            .agent(Method::POST, &path, "tester")
            .header(headers::LEASE, lease.to_string())
            .header("content-type", "application/octet-stream")
            .body(data.to_vec());
        expect_json(request.send().await.unwrap(), StatusCode::OK).await
    }

    // Waiting.

    /// GET `path` and its JSON, on 200.
    pub async fn get_json<T: DeserializeOwned>(&self, path: &str) -> Answer<T> {
        let response = self.request(Method::GET, path).send().await.unwrap();
        expect_json(response, StatusCode::OK).await
    }

    /// The task once it has ended (long polls of 30 s, for at most a minute).
    pub async fn until_done(&self, id: TaskId) -> Task {
        for _ in 0..2 {
            let task = self.wait(id, 30).await.unwrap();
            if task.status.is_terminal() {
                return task;
            }
        }
        panic!("task {id} did not end within a minute");
    }

    /// The task once its agent has confirmed that its command runs (`running_at` set by the
    /// first heartbeat, 250 ms after the start), for at most 30 s.
    pub async fn until_running(&self, id: TaskId) -> Task {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let task = self.get(id).await.unwrap();
            if task.running_at.is_some() {
                return task;
            }
            assert!(tokio::time::Instant::now() < deadline, "task {id} never ran: {task:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `parked` picks are parked, as the server reports on /health.
    pub async fn until_parked(&self, parked: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.health().await.unwrap();
            if health["parked_picks"] == parked {
                return;
            }
            assert!(tokio::time::Instant::now() < deadline, "never {parked} parked: {health}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn expect_json<T: DeserializeOwned>(response: Response, status: StatusCode) -> Answer<T> {
    if response.status() == status {
        Ok(response.json().await.unwrap())
    } else {
        Err(failure(response).await)
    }
}

async fn failure(response: Response) -> Failure {
    let status = response.status().as_u16();
    let problem = response.json().await.unwrap_or_default();
    Failure { status, problem }
}
