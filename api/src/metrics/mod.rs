//! The operator's view: Prometheus metrics at `GET /metrics` (admin and reader tokens).
//!
//! Each API process keeps its own registry (a `PrometheusRecorder` in managed state, not the
//! global recorder, so that several servers in one process stay apart). Three kinds of figures:
//! - counted where they happen, in this process: completions, lease expiries, the pick
//!   latency and run time histograms, HTTP requests (`HttpMetrics`, a fairing);
//! - read from this process at each scrape: parked picks, the pool's connections, LISTEN
//!   reconnects;
//! - the queue's and the agents' figures from the database (`queue.rs`): counted at most once
//!   per `metrics_refresh_secs` for all API processes together; a process reads them at most
//!   once per that period, and answers the scrapes in between from its copy.

mod queue;

use std::sync::Arc;

use metrics::{Counter, Histogram, Key, Label, Level, Metadata, Recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use rocket::fairing::{AdHoc, Fairing, Info, Kind};
use rocket::http::ContentType;
use rocket::{get, routes, Request, Response, Route, State};
use taskexec_protocol::{AgentState, Task, TaskStatus};

use crate::auth::{Allowed, Observe};
use crate::config::AppConfig;
use crate::dispatch::Dispatcher;

use crate::query::StrictQuery;
use crate::tasks::store::{Fate, Reaped};
use crate::Db;

static META: Metadata<'static> = Metadata::new(module_path!(), Level::INFO, Some(module_path!()));

/// Buckets of the latency histograms, in seconds: sub-millisecond picks to minutes.
const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0,
];
/// Buckets of a command's run time, in seconds: a `true` to a day.
const RUN_BUCKETS: &[f64] =
    &[0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

/// The registry of one API process, and the queue figures it last read. Cheap to clone (the
/// background loops hold one).
#[derive(Clone)]
pub struct Metrics {
    recorder: Arc<PrometheusRecorder>,
    handle: PrometheusHandle,
    pick_latency: Histogram,
    run_seconds: Histogram,
    queue: Arc<queue::Cache>,
}

impl Metrics {
    pub fn new(refresh: std::time::Duration) -> Metrics {
        let builder = PrometheusBuilder::new();
        let buckets = [
            ("taskexec_pick_latency_seconds", LATENCY_BUCKETS),
            ("taskexec_http_request_duration_seconds", LATENCY_BUCKETS),
            ("taskexec_task_run_seconds", RUN_BUCKETS),
        ];
        let builder = buckets.iter().fold(builder, |builder, (name, buckets)| {
            builder
                .set_buckets_for_metric(Matcher::Full((*name).to_owned()), buckets)
                .expect("the buckets are not empty")
        });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        // The exporter keeps one description per name, whatever its kind.
        for (name, help) in HELP {
            recorder.describe_gauge((*name).into(), None, (*help).into());
        }
        let pick_latency =
            recorder.register_histogram(&Key::from_name("taskexec_pick_latency_seconds"), &META);
        let run_seconds =
            recorder.register_histogram(&Key::from_name("taskexec_task_run_seconds"), &META);
        let version = [Label::new("version", env!("CARGO_PKG_VERSION"))];
        recorder
            .register_gauge(&Key::from_parts("taskexec_build_info", version.to_vec()), &META)
            .set(1.0);
        let queue = Arc::new(queue::Cache::new(refresh));
        let metrics =
            Metrics { recorder: Arc::new(recorder), handle, pick_latency, run_seconds, queue };
        // Every series of a known label exists from the start, at 0: a rate over a series that
        // appears only with its first event misses that event, and a dashboard shows a gap.
        for status in [TaskStatus::Finished, TaskStatus::Failed, TaskStatus::Cancelled] {
            let label = vec![Label::new("status", status.to_string())];
            metrics.counter("taskexec_tasks_completed_total", label).increment(0);
        }
        metrics.counter("taskexec_tasks_deleted_total", Vec::new()).increment(0);
        for outcome in ["requeued", "failed", "refunded"] {
            let label = vec![Label::new("outcome", outcome)];
            metrics.counter("taskexec_lease_expiries_total", label).increment(0);
        }
        metrics
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> Counter {
        self.recorder.register_counter(&Key::from_parts(name, labels), &META)
    }

    fn set_gauge(&self, name: &'static str, labels: Vec<Label>, value: f64) {
        self.recorder.register_gauge(&Key::from_parts(name, labels), &META).set(value);
    }

    /// A task this process recorded as ended (finished, failed or cancelled), with its run time
    /// when it ran.
    pub fn ended(&self, task: &Task) {
        if !task.status.is_terminal() {
            return;
        }
        let status = Label::new("status", task.status.to_string());
        self.counter("taskexec_tasks_completed_total", vec![status]).increment(1);
        if let (Some(running), Some(finished)) = (task.running_at, task.finished_at) {
            self.run_seconds.record(seconds_between(running, finished));
        }
    }

    /// The figures read from the database.
    fn database_figures(&self, read: &queue::Read) {
        let snapshot = &read.snapshot;
        let status = |s: &str| vec![Label::new("status", s.to_owned())];
        self.set_gauge("taskexec_tasks", status("queued"), snapshot.queued as f64);
        self.set_gauge("taskexec_tasks", status("in_progress"), snapshot.in_progress as f64);
        self.set_gauge("taskexec_tasks_delayed", Vec::new(), snapshot.delayed as f64);
        self.set_gauge("taskexec_tasks_unroutable", Vec::new(), snapshot.unroutable as f64);
        self.set_gauge("taskexec_queue_oldest_age_seconds", Vec::new(), read.oldest_queued_age());
        self.set_gauge("taskexec_tasks_stuck", Vec::new(), snapshot.stuck as f64);
        let agents = [
            (AgentState::Idle, snapshot.agents_idle),
            (AgentState::Busy, snapshot.agents_busy),
            (AgentState::Gone, snapshot.agents_gone),
        ];
        for (state, count) in agents {
            let label = vec![Label::new("state", state.as_str())];
            self.set_gauge("taskexec_agents", label, count as f64);
        }
    }

    /// A task handed to an agent: its wait from creation to the pick.
    pub fn picked(&self, task: &Task) {
        if let Some(started) = task.started_at {
            self.pick_latency.record(seconds_between(task.created_at, started));
        }
    }

    /// Tasks deleted by retention.
    pub fn deleted(&self, tasks: u64) {
        self.counter("taskexec_tasks_deleted_total", Vec::new()).increment(tasks);
    }

    /// What a reaper pass did: lease expiries by outcome, and the tasks it ended.
    pub fn reaped(&self, reaped: &Reaped) {
        let expiries = [
            ("requeued", reaped.count(Fate::Requeued)),
            ("refunded", reaped.count(Fate::Refunded)),
            ("failed", reaped.count(Fate::Lost) + reaped.count(Fate::Exhausted)),
        ];
        for (outcome, count) in expiries {
            if count > 0 {
                let label = Label::new("outcome", outcome);
                self.counter("taskexec_lease_expiries_total", vec![label]).increment(count as u64);
            }
        }
        let ended = [
            (
                TaskStatus::Failed,
                [Fate::Lost, Fate::TimedOut, Fate::Exhausted].map(|f| reaped.count(f)).iter().sum(),
            ),
            (TaskStatus::Cancelled, reaped.count(Fate::Cancelled)),
        ];
        for (status, count) in ended {
            if count > 0 {
                let label = Label::new("status", status.to_string());
                self.counter("taskexec_tasks_completed_total", vec![label]).increment(count as u64);
            }
        }
    }
}

/// `# HELP` of every metric.
const HELP: &[(&str, &str)] = &[
    ("taskexec_tasks", "Tasks queued or in progress, from the database (all API processes)."),
    (
        "taskexec_queue_oldest_age_seconds",
        "How long the queued task due first has been due (since its creation or run_at); 0 when none is.",
    ),
    (
        "taskexec_tasks_delayed",
        "Queued tasks not due yet (a run_at to come: a delay or a retry's backoff).",
    ),
    (
        "taskexec_tasks_unroutable",
        "Queued tasks whose tags no live agent has (all queued tasks when no agent is alive).",
    ),
    (
        "taskexec_tasks_stuck",
        "Tasks in progress past their lease, or past their timeout plus the kill grace.",
    ),
    (
        "taskexec_tasks_completed_total",
        "Tasks ended, by status, counted by the process that recorded the end.",
    ),
    ("taskexec_pick_latency_seconds", "From a task's creation to its pick."),
    ("taskexec_task_run_seconds", "From a command's start to its end, for tasks that ran."),
    ("taskexec_lease_expiries_total", "Leases that ran out, by what became of the task."),
    (
        "taskexec_tasks_deleted_total",
        "Ended tasks deleted by retention (retention_days), by this process.",
    ),
    ("taskexec_parked_picks", "Agents' picks parked in this API process right now."),
    ("taskexec_agents", "Agents seen in the last day, by state (as GET /agents shows them)."),
    ("taskexec_http_requests_total", "HTTP requests answered by this process, by route template."),
    ("taskexec_http_request_duration_seconds", "Time to the response's head, by route template."),
    ("taskexec_db_pool_connections", "This process's database pool connections, by state."),
    (
        "taskexec_listen_reconnects_total",
        "Times this process's LISTEN connection was established again.",
    ),
    ("taskexec_build_info", "The running version, as a label; always 1."),
];

fn seconds_between(from: chrono::DateTime<chrono::Utc>, to: chrono::DateTime<chrono::Utc>) -> f64 {
    (to - from).num_microseconds().map_or(0.0, |us| us.max(0) as f64 / 1e6)
}

/// The registry, from the settings (after `config::stage`).
pub fn stage() -> AdHoc {
    AdHoc::try_on_ignite("Metrics", |rocket| async {
        let Some(config) = rocket.state::<AppConfig>() else {
            return Err(rocket);
        };
        let metrics = Metrics::new(std::time::Duration::from_secs(config.metrics_refresh_secs));
        let handle = metrics.handle.clone();
        Ok(rocket.manage(metrics).attach(AdHoc::on_liftoff("Metrics upkeep", |rocket| {
            let mut shutdown = rocket.shutdown();
            Box::pin(async move {
                // Histograms keep their samples until they are folded in: a render does it,
                // and so does this, so that a process nobody scrapes does not grow.
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(UPKEEP);
                    loop {
                        tokio::select! {
                            _ = &mut shutdown => break,
                            _ = tick.tick() => handle.run_upkeep(),
                        }
                    }
                });
            })
        })))
    })
}

/// How often histogram samples are folded in when nobody scrapes.
const UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

pub fn routes() -> Vec<Route> {
    routes![scrape]
}

#[derive(utoipa::OpenApi)]
#[openapi(paths(scrape))]
pub struct ApiDoc;

/// The metrics in Prometheus's text format (0.0.4).
#[utoipa::path(
    get,
    path = "/metrics",
    operation_id = "getMetrics",
    summary = "Prometheus metrics",
    tag = "operations",
    security(("bearer" = ["admin", "reader"])),
    responses((status = 200, description = "Prometheus's text format 0.0.4", content_type = "text/plain", body = String))
)]
#[get("/metrics")]
async fn scrape(
    _access: Allowed<Observe>,
    _query: StrictQuery,
    metrics: &State<Metrics>,
    config: &State<AppConfig>,
    db: &Db,
    dispatcher: &State<Dispatcher>,
) -> (ContentType, String) {
    // Without the database, the process's own figures still go out (and the database's as
    // last read): they are what tells why.
    match metrics.queue.get(db, config).await {
        Ok(read) => metrics.database_figures(&read),
        Err(queue::Unread::Backoff) => {}
        Err(e) => log::warn!("GET /metrics without the queue's figures: {e}"),
    }
    metrics.set_gauge("taskexec_parked_picks", Vec::new(), dispatcher.parked() as f64);
    let reconnects = dispatcher.listen_reconnects();
    metrics.counter("taskexec_listen_reconnects_total", Vec::new()).absolute(reconnects);
    let (size, idle) = (db.pool().size() as f64, db.pool().num_idle() as f64);
    let state = |s: &str| vec![Label::new("state", s.to_owned())];
    metrics.set_gauge("taskexec_db_pool_connections", state("idle"), idle);
    metrics.set_gauge("taskexec_db_pool_connections", state("in_use"), (size - idle).max(0.0));
    let format =
        ContentType::new("text", "plain").with_params([("version", "0.0.4"), ("charset", "utf-8")]);
    (format, metrics.handle.render())
}

/// Counts every request by method, route template (`/tasks/<id>`, never the id itself, so that
/// the labels stay few) and status, and times it to its response's head (from its arrival, as
/// `logging::RequestLog`, attached first, saw it).
pub struct HttpMetrics;

#[rocket::async_trait]
impl Fairing for HttpMetrics {
    fn info(&self) -> Info {
        Info { name: "HTTP metrics", kind: Kind::Response }
    }

    async fn on_response<'r>(&self, request: &'r Request<'_>, response: &mut Response<'r>) {
        let Some(metrics) = request.rocket().state::<Metrics>() else { return };
        let route = request.route().map_or("unmatched".to_owned(), |r| r.uri.path().to_string());
        let method = Label::new("method", request.method().as_str());
        let path = Label::new("route", route);
        let status = Label::new("status", response.status().code.to_string());
        metrics
            .counter("taskexec_http_requests_total", vec![method.clone(), path.clone(), status])
            .increment(1);
        let key = Key::from_parts("taskexec_http_request_duration_seconds", vec![method, path]);
        metrics
            .recorder
            .register_histogram(&key, &META)
            .record(crate::logging::elapsed(request).as_secs_f64());
    }
}
