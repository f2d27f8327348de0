//! Per-component benchmarks: key parsing, fingerprinting, record encoding,
//! the memory store, and the whole layer over a trivial `service_fn` for each
//! outcome (no network), beside the bare service as the baseline.
//!
//! Before the timings, it prints the heap allocations each layer outcome
//! makes per request, and the heap a completed 1 KiB record keeps in the
//! memory store, counted by a global allocator that wraps the system's.
//!
//! `cargo bench --bench components` (add a filter, e.g. `-- layer/`).

use std::{
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicI64, AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tower::{Layer, Service, ServiceExt};
use tower_idempotency::{
    Fingerprint, IdempotencyKey, IdempotencyLayer, Record, RecordId, RequestBody, Scope, StoredResponse,
    store::{Claim, ClaimRequest, MemoryStore, Store},
};

/// The system allocator, counting allocations and the bytes they hold.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
/// Heap bytes held, each allocation counted as glibc's malloc rounds it:
/// its size plus an 8-byte header, to a multiple of 16, at least 32.
static HELD: AtomicI64 = AtomicI64::new(0);

fn chunk(size: usize) -> i64 {
    ((size + 8 + 15) & !15).max(32) as i64
}

// SAFETY: every call is passed on unchanged to the system allocator.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        HELD.fetch_add(chunk(layout.size()), Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { std::alloc::System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        HELD.fetch_sub(chunk(layout.size()), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        HELD.fetch_add(chunk(new_size) - chunk(layout.size()), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn key_parsing(c: &mut Criterion) {
    let mut group = c.benchmark_group("key");
    group.bench_function("bare", |b| b.iter(|| IdempotencyKey::parse(black_box(b"4f7d8c2e-order-1234567"))));
    group.bench_function("quoted", |b| b.iter(|| IdempotencyKey::parse(black_box(br#""4f7d8c2e-order-1234567""#))));
    let key: IdempotencyKey = "4f7d8c2e-order-1234567".parse().unwrap();
    let scope = Scope::hashed(b"Bearer sk_test_1");
    group.bench_function("record_id", |b| b.iter(|| RecordId::new("", black_box(&scope), black_box(&key))));
    group.finish();
}

fn fingerprinting(c: &mut Criterion) {
    let mut group = c.benchmark_group("fingerprint");
    let (parts, ()) = Request::post("/v1/charges?expand=customer")
        .header("content-type", "application/json")
        .body(())
        .unwrap()
        .into_parts();
    for size in [1024usize, 64 * 1024] {
        let body = vec![b'x'; size];
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &body, |b, body| {
            b.iter(|| Fingerprint::of(&parts, &[http::header::CONTENT_TYPE], black_box(body)))
        });
    }
    group.finish();
}

fn sample_record(body: usize) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", "application/json".parse().unwrap());
    headers.insert("request-id", "req_8d7f6e5d4c3b2a19".parse().unwrap());
    let response = StoredResponse::new(StatusCode::OK, headers, Bytes::from(vec![b'x'; body]), None);
    Record::new(Fingerprint::from_bytes([7; 32]), response)
}

fn records(c: &mut Criterion) {
    let mut group = c.benchmark_group("record");
    for size in [1024usize, 64 * 1024] {
        let record = sample_record(size);
        let encoded = record.encode();
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::new("encode", size), &record, |b, record| b.iter(|| record.encode()));
        group.bench_with_input(BenchmarkId::new("decode", size), &encoded, |b, encoded| {
            b.iter(|| Record::decode(encoded.clone()).unwrap())
        });
    }
    group.finish();
}

fn memory_store(c: &mut Criterion) {
    let runtime = runtime();
    let mut group = c.benchmark_group("memory_store");
    let store = MemoryStore::with_limits(10_000_000, usize::MAX);
    let record = sample_record(1024);
    let mut n = 0u64;
    group.bench_function("claim_complete", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let id = RecordId::from_bytes(id_bytes(n));
            let (store, record) = (&store, record.clone());
            async move {
                let request = ClaimRequest::new(id, Fingerprint::from_bytes([7; 32]), Duration::from_secs(30));
                let Ok(Claim::Acquired(lease)) = store.claim(request).await else { panic!("claimed") };
                store.complete(&id, lease.owner(), record, Duration::from_secs(3600)).await.unwrap();
            }
        })
    });
    // Claims given back at once keep the table small, so that what is left
    // is the claim's own work; on two threads at once, as a server's two
    // workers, what they share (the store's counters, their cache lines)
    // shows too.
    let round = AtomicU64::new(0);
    for threads in [1, 2] {
        group.bench_function(BenchmarkId::new("claim_release", format!("{threads}_threads")), |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                // Each thread's keys its own, with no counter shared to draw them.
                let first = (round.fetch_add(1, Ordering::Relaxed) + 1) << 40;
                std::thread::scope(|scope| {
                    for thread in 0..threads {
                        let store = &store;
                        scope.spawn(move || {
                            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
                            runtime.block_on(async {
                                for n in 0..iters.div_ceil(threads) {
                                    let id = RecordId::from_bytes(id_bytes(first + (thread << 36) + n));
                                    let fingerprint = Fingerprint::from_bytes([7; 32]);
                                    let request = ClaimRequest::new(id, fingerprint, Duration::from_secs(30));
                                    let Ok(Claim::Acquired(lease)) = store.claim(request).await else {
                                        panic!("claimed")
                                    };
                                    store.release(&id, lease.owner()).await.unwrap();
                                }
                            });
                        });
                    }
                });
                start.elapsed()
            })
        });
    }
    let hot = RecordId::from_bytes(id_bytes(u64::MAX));
    runtime.block_on(async {
        let request = ClaimRequest::new(hot, Fingerprint::from_bytes([7; 32]), Duration::from_secs(30));
        let Ok(Claim::Acquired(lease)) = store.claim(request).await else { panic!("claimed") };
        store.complete(&hot, lease.owner(), record.clone(), Duration::from_secs(3600)).await.unwrap();
    });
    group.bench_function("replay_claim", |b| {
        b.to_async(&runtime).iter(|| async {
            let request = ClaimRequest::new(hot, Fingerprint::from_bytes([7; 32]), Duration::from_secs(30));
            black_box(store.claim(request).await.unwrap())
        })
    });
    group.finish();
}

/// The worker guard on the memory store against the same work called bare:
/// a first run of a fresh key (claim, work, completion) and a replay.
fn guard(c: &mut Criterion) {
    use tower_idempotency::guard::Guard;
    let runtime = runtime();
    let mut group = c.benchmark_group("guard");
    let order = serde_json::json!({"order_id": "o-1", "amount": 500, "currency": "usd"});
    let work = || async { Ok::<_, std::io::Error>(String::from("ch_1")) };
    group.bench_function("bare", |b| b.to_async(&runtime).iter(|| async { black_box(work().await.unwrap()) }));
    let guard = Guard::new(MemoryStore::with_limits(10_000_000, usize::MAX));
    let mut n = 0u64;
    group.bench_function("first_run", |b| {
        b.to_async(&runtime).iter(|| {
            n += 1;
            let (guard, order) = (&guard, &order);
            async move {
                let key = format!("order:{n}");
                black_box(guard.run(&key, order, |_| work()).await.unwrap())
            }
        })
    });
    runtime.block_on(guard.run("order:hot", &order, |_| work())).unwrap();
    group.bench_function("replay", |b| {
        b.to_async(&runtime).iter(|| async { black_box(guard.run("order:hot", &order, |_| work()).await.unwrap()) })
    });
    group.finish();
}

fn id_bytes(n: u64) -> [u8; 32] {
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&n.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_be_bytes());
    bytes[8..16].copy_from_slice(&n.to_be_bytes());
    bytes
}

/// The trivial handler, for the layer's request body or the plain one.
fn handler<B: Send + 'static>()
-> impl Service<Request<B>, Response = Response<Full<Bytes>>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ Sync
+ 'static {
    tower::service_fn(|_: Request<B>| async {
        let mut response = Response::new(Full::new(Bytes::from_static(br#"{"id":"ch_1","amount":500}"#)));
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        Ok::<_, Infallible>(response)
    })
}

fn request(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut builder = Request::post("/v1/charges")
        .header("content-type", "application/x-www-form-urlencoded")
        .header("authorization", "Bearer sk_test_1");
    if let Some(key) = key {
        builder = builder.header("idempotency-key", key);
    }
    builder.body(Full::new(Bytes::from_static(b"amount=500&currency=usd&source=tok_visa"))).unwrap()
}

/// One request through a clone of `service`, as servers clone a service per
/// request; the body read to its end.
async fn drive<S, B>(mut service: S, request: Request<Full<Bytes>>)
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes>,
    B::Error: std::fmt::Debug,
{
    let response = service.ready().await.unwrap().call(request).await.unwrap();
    black_box(response.into_body().collect().await.unwrap());
}

/// Times `iters` requests made by `make` through `service`, in a task on a
/// runtime worker as a server's connection task would run them (not on the
/// bench thread, which would add a cross-thread wake-up to every spawn).
fn measure<S, B>(
    runtime: &tokio::runtime::Runtime,
    service: &S,
    make: fn(u64) -> Request<Full<Bytes>>,
    iters: u64,
) -> Duration
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Debug,
{
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let service = service.clone();
    runtime.block_on(async move {
        tokio::spawn(async move {
            let start = Instant::now();
            for _ in 0..iters {
                drive(service.clone(), make(NEXT.fetch_add(1, Ordering::Relaxed))).await;
            }
            start.elapsed()
        })
        .await
        .unwrap()
    })
}

fn layer(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut group = c.benchmark_group("layer");
    let bare = handler::<Full<Bytes>>();
    group.bench_function("bare_service", |b| b.iter_custom(|iters| measure(&runtime, &bare, |_| request(None), iters)));

    let idempotency = IdempotencyLayer::new(MemoryStore::with_limits(10_000_000, usize::MAX));
    let guarded = idempotency.layer(handler::<RequestBody<Full<Bytes>>>());
    group.bench_function("passthrough_no_key", |b| {
        b.iter_custom(|iters| measure(&runtime, &guarded, |_| request(None), iters))
    });
    group.bench_function("first_execution", |b| {
        b.iter_custom(|iters| measure(&runtime, &guarded, |n| request(Some(&format!("fresh-{n}"))), iters))
    });
    runtime.block_on(drive(guarded.clone(), request(Some("hot-key"))));
    group.bench_function("replay", |b| {
        b.iter_custom(|iters| measure(&runtime, &guarded, |_| request(Some("hot-key")), iters))
    });
    group.finish();
}

/// Prints the allocations per request of each layer outcome, the request
/// itself and the reading of the response included, as `drive` makes them.
fn allocations() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let idempotency = IdempotencyLayer::new(MemoryStore::with_limits(10_000_000, usize::MAX));
    let guarded = idempotency.layer(handler::<RequestBody<Full<Bytes>>>());
    runtime.block_on(drive(guarded.clone(), request(Some("hot-key"))));
    let bare = handler::<Full<Bytes>>();
    let rows = [
        ("bare_service", allocations_per_request(&runtime, &bare, |_| request(None))),
        ("passthrough_no_key", allocations_per_request(&runtime, &guarded, |_| request(None))),
        ("first_execution", allocations_per_request(&runtime, &guarded, |n| request(Some(&format!("fresh-{n}"))))),
        ("replay", allocations_per_request(&runtime, &guarded, |_| request(Some("hot-key")))),
    ];
    println!("allocations per request (request and response included):");
    for (name, allocations) in rows {
        println!("  layer/{name:<20} {allocations:6.1}");
    }
}

/// Heap allocations per request through `service`, made as [`measure`]
/// makes them, without those of the measuring task itself.
fn allocations_per_request<S, B>(
    runtime: &tokio::runtime::Runtime,
    service: &S,
    make: fn(u64) -> Request<Full<Bytes>>,
) -> f64
where
    S: Service<Request<Full<Bytes>>, Response = Response<B>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send,
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::fmt::Debug,
{
    const REQUESTS: u64 = 1_000;
    let allocated = |requests| {
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        measure(runtime, service, make, requests);
        ALLOCATIONS.load(Ordering::Relaxed) - before
    };
    // A run of no requests counts what spawning the measuring task costs.
    let overhead = allocated(0);
    (allocated(REQUESTS) - overhead) as f64 / REQUESTS as f64
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = key_parsing, fingerprinting, records, memory_store, layer, guard
}

/// Prints the heap a completed record keeps in the memory store: `records`
/// first executions through the layer, each answered with a fresh 1 KiB
/// body and two headers, as a handler that serializes its answer makes it;
/// what is still held once every request and response is dropped, per
/// record, against the target of body + headers + 200 B. Then again once
/// each record has been replayed: sharing a record's buffer gives it a
/// reference count.
fn memory_per_record(records: u64) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let store = MemoryStore::with_limits(usize::MAX, usize::MAX);
    let handler = tower::service_fn(|_: Request<RequestBody<Full<Bytes>>>| async {
        let mut response = Response::new(Full::new(Bytes::from(vec![b'x'; 1024])));
        response.headers_mut().insert("content-type", "application/json".parse().unwrap());
        response.headers_mut().insert("request-id", "req_8d7f6e5d4c3b2a19".parse().unwrap());
        Ok::<_, Infallible>(response)
    });
    let headers = "content-type".len() + "application/json".len() + "request-id".len() + "req_8d7f6e5d4c3b2a19".len();
    let guarded = IdempotencyLayer::new(store.clone()).layer(handler);
    let send_all = || {
        let guarded = guarded.clone();
        runtime.block_on(async move {
            tokio::spawn(async move {
                for n in 0..records {
                    drive(guarded.clone(), request(Some(&format!("record-{n}")))).await;
                }
            })
            .await
            .unwrap()
        })
    };
    // The runtime's own first allocations are not the records'.
    measure(&runtime, &guarded, |n| request(Some(&format!("warm-{n}"))), 1);
    let before = HELD.load(Ordering::Relaxed);
    send_all();
    let completed = (HELD.load(Ordering::Relaxed) - before) as f64 / records as f64;
    send_all();
    let replayed = (HELD.load(Ordering::Relaxed) - before) as f64 / records as f64;
    assert_eq!(store.len() as u64, records + 1);
    let over = |held: f64| held - (1024 + headers) as f64;
    println!(
        "memory store, {records} records, heap per completed record, 1024 B body and {headers} B of headers: \
         {completed:.0} B (body + headers + {:.0} B); once replayed {replayed:.0} B (+ {:.0} B); target + 200 B",
        over(completed),
        over(replayed)
    );
}

fn main() {
    allocations();
    // Hash tables double as they grow: 1,000,000 records leave this one's
    // less full than 100,000 do.
    for records in [100_000, 1_000_000] {
        memory_per_record(records);
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
