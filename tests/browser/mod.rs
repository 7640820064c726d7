//! Headless Chromium driven over the DevTools protocol: one browser per test process, one
//! page, real navigation, real forms and real cookies. `goto` and `submit` wait for the page's
//! load event and return the DOM as the browser built it; `screenshot` keeps a PNG of the page
//! under the target directory (`console-shots/`) for people to look at.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// Guards against a hung browser; not a timing assertion.
const HANG: Duration = Duration::from_secs(60);

pub struct Browser {
    child: Child,
    ws: WebSocket<MaybeTlsStream<TcpStream>>,
    session: String,
    next_id: u64,
    /// Events received while waiting for command results.
    events: Vec<Value>,
    _profile: tempfile::TempDir,
    pub shots: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Starts Chromium; `None` if it is not installed (the caller decides to skip).
    pub fn start() -> Option<Self> {
        if Command::new("chromium")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            return None;
        }
        let profile = tempfile::tempdir().expect("profile dir");
        let child = Command::new("chromium")
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,900",
                // Every request stays on loopback.
                "--proxy-server=http://127.0.0.1:9",
                "--proxy-bypass-list=127.0.0.1;localhost",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        // Chromium writes its port and browser endpoint path into the profile when ready.
        let port_file = profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        let endpoint = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                let mut lines = text.lines();
                if let (Some(port), Some(path)) = (lines.next(), lines.next()) {
                    break format!("ws://127.0.0.1:{port}{path}");
                }
            }
            assert!(started.elapsed() < HANG, "chromium did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        let (ws, _) = tungstenite::connect(endpoint.as_str()).expect("DevTools connection");
        if let MaybeTlsStream::Plain(s) = ws.get_ref() {
            s.set_read_timeout(Some(HANG)).expect("read timeout");
        }
        let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("console-shots");
        std::fs::create_dir_all(&shots).expect("screenshot dir");
        let mut b = Self {
            child,
            ws,
            session: String::new(),
            next_id: 0,
            events: Vec::new(),
            _profile: profile,
            shots,
        };
        let target = b.browser_call("Target.createTarget", json!({ "url": "about:blank" }));
        let target_id = target["targetId"].as_str().expect("target id").to_string();
        let attached = b.browser_call(
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        b.session = attached["sessionId"]
            .as_str()
            .expect("session id")
            .to_string();
        b.call("Page.enable", json!({}));
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        Some(b)
    }

    fn send(&mut self, method: &str, params: Value, session: bool) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if session {
            msg["sessionId"] = json!(self.session);
        }
        self.ws
            .send(Message::text(msg.to_string()))
            .expect("DevTools send");
        loop {
            let v = self.read();
            if v["id"].as_u64() == Some(id) {
                if let Some(e) = v.get("error") {
                    panic!("{method} failed: {e}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    fn read(&mut self) -> Value {
        loop {
            match self.ws.read().expect("DevTools message") {
                Message::Text(t) => {
                    return serde_json::from_str(t.as_str()).expect("DevTools JSON");
                }
                Message::Close(_) => panic!("chromium closed the DevTools connection"),
                _ => {}
            }
        }
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, false)
    }

    /// A command on the page.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, true)
    }

    fn wait_for_load(&mut self) {
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["method"] == "Page.loadEventFired")
            {
                self.events.drain(..=i);
                return;
            }
            let v = self.read();
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// The value of a JavaScript expression evaluated in the page (the test's, not the page's:
    /// the console itself has no scripts).
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({ "expression": expression, "returnByValue": true }),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("{expression}: {e}");
        }
        r["result"]["value"].clone()
    }

    pub fn dom(&mut self) -> String {
        self.eval("document.documentElement.outerHTML")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    pub fn url(&mut self) -> String {
        self.eval("location.href")
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// Opens `url` and returns the DOM once it has loaded.
    pub fn goto(&mut self, url: &str) -> String {
        self.events.clear();
        let r = self.call("Page.navigate", json!({ "url": url }));
        if let Some(e) = r.get("errorText") {
            panic!("navigating to {url}: {e}");
        }
        self.wait_for_load();
        self.dom()
    }

    /// Runs `script` (which submits a form or follows a link) and returns the DOM of the page
    /// it leads to.
    pub fn submit(&mut self, script: &str) -> String {
        self.events.clear();
        self.eval(script);
        self.wait_for_load();
        self.dom()
    }

    /// Fills the sign-in form on the current page and submits it.
    pub fn sign_in(&mut self, user: &str, password: &str) -> String {
        self.submit(&format!(
            "document.querySelector('#user').value = {}; \
             document.querySelector('#password').value = {}; \
             document.querySelector('form[action=\"/-/login\"]').submit()",
            json!(user),
            json!(password)
        ))
    }

    /// A PNG of the whole page at a desktop width, kept as `<name>.png`.
    pub fn screenshot(&mut self, name: &str) -> PathBuf {
        self.screenshot_at(name, 1280)
    }

    /// A PNG of the whole page laid out `width` CSS pixels wide (390: a phone).
    pub fn screenshot_at(&mut self, name: &str, width: u64) -> PathBuf {
        let mobile = width < 640;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": mobile }),
        );
        let height = self
            .eval("Math.ceil(document.documentElement.scrollHeight)")
            .as_u64()
            .unwrap_or(900)
            .clamp(300, 6000);
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile }),
        );
        let shot = self.call("Page.captureScreenshot", json!({ "format": "png" }));
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({ "width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false }),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("screenshot base64");
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        let path = self.shots.join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }
}
