//! A plain HTTP server on 127.0.0.1:0 that serves fixed documents, for commands that fetch one
//! (`capitctl price update --from URL`). Each path answers with its status, headers and body;
//! anything else is a 404. It counts the requests it answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::oneshot;

#[derive(Clone)]
pub struct Document {
    pub path: String,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Document {
    pub fn ok(path: &str, body: &str) -> Document {
        Document { path: path.into(), status: 200, headers: vec![("content-type".into(), "application/json".into())], body: body.into() }
    }

    pub fn redirect(path: &str, to: &str) -> Document {
        Document { path: path.into(), status: 302, headers: vec![("location".into(), to.into())], body: String::new() }
    }
}

pub struct FileServer {
    pub addr: SocketAddr,
    served: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FileServer {
    pub fn start(documents: Vec<Document>) -> FileServer {
        let documents = Arc::new(documents);
        let served = Arc::new(AtomicUsize::new(0));
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, mut stop_rx) = oneshot::channel::<()>();
        let counter = served.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                addr_tx.send(listener.local_addr().unwrap()).unwrap();
                loop {
                    let (stream, _) = tokio::select! {
                        _ = &mut stop_rx => return,
                        accepted = listener.accept() => match accepted { Ok(a) => a, Err(_) => continue },
                    };
                    let documents = documents.clone();
                    let counter = counter.clone();
                    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let found = documents.iter().find(|d| d.path == req.uri().path()).cloned();
                        async move {
                            let mut response = Response::builder();
                            let body = match found {
                                Some(doc) => {
                                    response = response.status(doc.status);
                                    for (name, value) in &doc.headers {
                                        response = response.header(name.as_str(), value.as_str());
                                    }
                                    doc.body
                                }
                                None => {
                                    response = response.status(404);
                                    "not found".to_string()
                                }
                            };
                            Ok::<_, Infallible>(response.body(Full::new(Bytes::from(body))).unwrap())
                        }
                    });
                    tokio::spawn(async move {
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            });
        });
        let addr = addr_rx.recv().unwrap();
        FileServer { addr, served, stop: Some(stop), thread: Some(thread) }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
