//! Real-browser harness for dashboard tests: starts `chromedriver` on a free loopback port and
//! drives headless Chromium through it with `fantoccini`; chromedriver is killed on drop.

use std::cell::RefCell;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

use crate::wait_for;

/// Where Debian and friends put chromedriver when it is not on `PATH`.
const DRIVER_FALLBACKS: &[&str] = &["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"];
/// The Chromium binary handed to chromedriver when present (otherwise it searches itself).
const CHROMIUM: &str = "/usr/bin/chromium";

/// Finds `chromedriver` on `PATH` or in the usual Debian locations.
pub fn find_chromedriver() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("chromedriver");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    for p in DRIVER_FALLBACKS {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "chromedriver not found (looked on PATH and in {DRIVER_FALLBACKS:?}): install the \
         chromium and chromium-driver packages (apt-get install chromium chromium-driver), \
         or run deploy/test.sh as root, which installs them"
    )
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

/// A chromedriver process plus a WebDriver session in headless Chromium.
pub struct Browser {
    /// The WebDriver session.
    pub client: Client,
    driver: Child,
    /// chromedriver's address.
    url: String,
}

impl Browser {
    /// Starts chromedriver and opens a headless Chromium session; fails (never skips) when
    /// chromedriver is missing.
    pub async fn start() -> anyhow::Result<Browser> {
        let exe = find_chromedriver()?;
        let port = free_port()?;
        let mut driver = Command::new(&exe)
            .arg(format!("--port={port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        let url = format!("http://127.0.0.1:{port}");
        match Self::connect(&url, &mut driver).await {
            Ok(client) => Ok(Browser {
                client,
                driver,
                url,
            }),
            Err(e) => {
                let _ = driver.kill();
                let _ = driver.wait();
                Err(e)
            }
        }
    }

    async fn connect(url: &str, driver: &mut Child) -> anyhow::Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()?;
        let status = format!("{url}/status");
        wait_for("chromedriver to answer", Duration::from_secs(30), || {
            let exited = driver.try_wait();
            let req = http.get(&status).send();
            async move {
                if let Some(st) = exited? {
                    bail!("chromedriver exited early: {st}");
                }
                Ok(req
                    .await
                    .ok()
                    .filter(|r| r.status().is_success())
                    .map(|_| ()))
            }
        })
        .await?;

        let mut chrome = json!({
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-dev-shm-usage",
                "--disable-gpu",
                "--window-size=1400,1000",
            ],
        });
        if std::path::Path::new(CHROMIUM).is_file() {
            chrome["binary"] = json!(CHROMIUM);
        }
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), chrome);
        // Keeps the page's console errors for `console_errors`.
        caps.insert("goog:loggingPrefs".into(), json!({ "browser": "SEVERE" }));
        let client = ClientBuilder::rustls()
            .context("TLS setup for the WebDriver client")?
            .capabilities(caps)
            .connect(url)
            .await
            .context("opening a headless Chromium session through chromedriver")?;
        Ok(client)
    }

    /// The browser's console errors (uncaught exceptions, failed loads, `console.error`) since
    /// the last call, through chromedriver's log endpoint.
    pub async fn console_errors(&self) -> anyhow::Result<Vec<String>> {
        let id = self
            .client
            .session_id()
            .await?
            .context("no WebDriver session")?;
        let v: Value = reqwest::Client::new()
            .post(format!("{}/session/{id}/se/log", self.url))
            .json(&json!({ "type": "browser" }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        Ok(v["value"]
            .as_array()
            .context("chromedriver's log answer has no value")?
            .iter()
            .filter(|e| e["level"] == "SEVERE")
            .map(|e| e["message"].as_str().unwrap_or_default().to_string())
            .collect())
    }

    /// Text of the first element matching `css`.
    pub async fn text(&self, css: &str) -> anyhow::Result<String> {
        let el = self.client.find(Locator::Css(css)).await?;
        Ok(el.text().await?)
    }

    /// Whether any element matches `css` right now.
    pub async fn exists(&self, css: &str) -> anyhow::Result<bool> {
        Ok(!self.client.find_all(Locator::Css(css)).await?.is_empty())
    }

    /// Polls until the first element matching `css` has text `want` (trimmed), at most `limit`.
    pub async fn wait_text(&self, css: &str, want: &str, limit: Duration) -> anyhow::Result<()> {
        let last = RefCell::new(String::new());
        let r = wait_for(&format!("{css} to read {want:?}"), limit, || async {
            Ok(match self.text(css).await {
                Ok(t) if t.trim() == want => Some(()),
                Ok(t) => {
                    *last.borrow_mut() = t;
                    None
                }
                Err(_) => None,
            })
        })
        .await;
        r.with_context(|| format!("last text seen: {:?}", last.borrow()))
    }

    /// Polls until the first element matching `css` has attribute `attr`, and returns it as soon
    /// as `done` accepts it, at most `limit`.
    pub async fn wait_attr(
        &self,
        css: &str,
        attr: &str,
        limit: Duration,
        done: impl Fn(&str) -> bool,
    ) -> anyhow::Result<String> {
        let last = RefCell::new(None);
        let r = wait_for(&format!("{css}[{attr}]"), limit, || async {
            let Ok(el) = self.client.find(Locator::Css(css)).await else {
                return Ok(None);
            };
            let v = el.attr(attr).await?;
            *last.borrow_mut() = v.clone();
            Ok(v.filter(|v| done(v)))
        })
        .await;
        r.with_context(|| format!("last value seen: {:?}", last.borrow()))
    }

    /// Runs `script` in the page and returns its result.
    pub async fn js(&self, script: &str) -> anyhow::Result<Value> {
        Ok(self.client.execute(script, vec![]).await?)
    }

    /// Ends the WebDriver session (closing Chromium); chromedriver goes on drop.
    pub async fn close(self) -> anyhow::Result<()> {
        self.client.clone().close().await?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
