//! Turns a stored event into the body one endpoint format expects: the distribution webhook
//! envelope, a CloudEvents 1.0 structured-mode event, or GCR's Pub/Sub message. Pure: no I/O.

use serde_json::{Map, Value, json};

use crate::config::NotifyFormat;
use crate::store::outbox::{EventKind, StoredEvent};

/// The distribution envelope's media type.
pub const DISTRIBUTION_MEDIA_TYPE: &str = "application/vnd.docker.distribution.events.v1+json";
pub const CLOUDEVENTS_MEDIA_TYPE: &str = "application/cloudevents+json";

/// What an endpoint receives for one event.
pub struct Body {
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

/// The stable id of an event: the same on every delivery attempt and after restarts.
pub fn event_id(instance: &str, seq: u64) -> String {
    format!("{instance}-{seq:016x}")
}

/// RFC 3339 with milliseconds, UTC.
pub fn timestamp(ms: u64) -> String {
    let secs = crate::auth::token::rfc3339(ms / 1000);
    format!("{}.{:03}Z", secs.trim_end_matches('Z'), ms % 1000)
}

/// The body for `format`, or `None` if the format cannot express this kind of event (GCR
/// has no message for a pull).
pub fn render(format: NotifyFormat, host: &str, instance: &str, ev: &StoredEvent) -> Option<Body> {
    let id = event_id(instance, ev.seq);
    let (content_type, value) = match format {
        NotifyFormat::Distribution => (
            DISTRIBUTION_MEDIA_TYPE,
            json!({ "events": [distribution(host, instance, &id, ev)] }),
        ),
        NotifyFormat::Cloudevents => (CLOUDEVENTS_MEDIA_TYPE, cloudevent(host, &id, ev)),
        NotifyFormat::Gcr => ("application/json", gcr(host, ev)?),
    };
    Some(Body {
        content_type,
        bytes: serde_json::to_vec(&value).unwrap_or_default(),
    })
}

fn put_some(m: &mut Map<String, Value>, key: &str, v: Option<Value>) {
    if let Some(v) = v {
        m.insert(key.to_string(), v);
    }
}

fn distribution(host: &str, instance: &str, id: &str, ev: &StoredEvent) -> Value {
    let r = &ev.record;
    let mut target = Map::new();
    target.insert("repository".into(), json!(r.repository));
    put_some(
        &mut target,
        "mediaType",
        r.media_type.as_ref().map(|v| json!(v)),
    );
    put_some(&mut target, "size", r.size.map(|v| json!(v)));
    put_some(&mut target, "length", r.size.map(|v| json!(v)));
    put_some(&mut target, "digest", r.digest.as_ref().map(|v| json!(v)));
    put_some(&mut target, "tag", r.tag.as_ref().map(|v| json!(v)));
    put_some(
        &mut target,
        "previous",
        r.previous.as_ref().map(|v| json!(v)),
    );
    if let Some(d) = &r.digest {
        let kind = if r.media_type.is_some() {
            "manifests"
        } else {
            "blobs"
        };
        target.insert(
            "url".into(),
            json!(format!("http://{host}/v2/{}/{kind}/{d}", r.repository)),
        );
    }
    let mut event = Map::new();
    event.insert("id".into(), json!(id));
    event.insert("timestamp".into(), json!(timestamp(r.time_ms)));
    event.insert("action".into(), json!(r.action.as_str()));
    event.insert("target".into(), Value::Object(target));
    event.insert("request".into(), json!({ "host": host }));
    if let Some(a) = &r.actor {
        event.insert("actor".into(), json!({ "name": a }));
    }
    event.insert(
        "source".into(),
        json!({ "addr": host, "instanceID": instance }),
    );
    Value::Object(event)
}

fn cloudevent(host: &str, id: &str, ev: &StoredEvent) -> Value {
    let r = &ev.record;
    let subject = match (&r.tag, &r.digest) {
        (Some(t), _) => format!("{}:{t}", r.repository),
        (None, Some(d)) => format!("{}@{d}", r.repository),
        (None, None) => r.repository.clone(),
    };
    let mut data = Map::new();
    data.insert("repository".into(), json!(r.repository));
    put_some(&mut data, "digest", r.digest.as_ref().map(|v| json!(v)));
    put_some(&mut data, "tag", r.tag.as_ref().map(|v| json!(v)));
    put_some(
        &mut data,
        "mediaType",
        r.media_type.as_ref().map(|v| json!(v)),
    );
    put_some(&mut data, "size", r.size.map(|v| json!(v)));
    put_some(&mut data, "previous", r.previous.as_ref().map(|v| json!(v)));
    put_some(&mut data, "actor", r.actor.as_ref().map(|v| json!(v)));
    json!({
        "specversion": "1.0",
        "id": id,
        "source": format!("transship://{host}"),
        "type": format!("dev.transship.{}", r.action.as_str()),
        "subject": subject,
        "time": timestamp(r.time_ms),
        "datacontenttype": "application/json",
        "data": Value::Object(data),
    })
}

fn gcr(host: &str, ev: &StoredEvent) -> Option<Value> {
    let r = &ev.record;
    let action = match r.action {
        EventKind::Push | EventKind::CacheFill | EventKind::TagMoved => "INSERT",
        EventKind::Delete | EventKind::CacheEvict => "DELETE",
        EventKind::Pull => return None,
    };
    let name = format!("{host}/{}", r.repository);
    let mut m = Map::new();
    m.insert("action".into(), json!(action));
    put_some(
        &mut m,
        "digest",
        r.digest.as_ref().map(|d| json!(format!("{name}@{d}"))),
    );
    put_some(
        &mut m,
        "tag",
        r.tag.as_ref().map(|t| json!(format!("{name}:{t}"))),
    );
    Some(Value::Object(m))
}

/// `sha256=<hex>`: HMAC-SHA256 of the body under the endpoint's secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use aws_lc_rs::hmac;
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    format!("sha256={}", hex::encode(hmac::sign(&key, body).as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::outbox::EventRecord;

    fn push() -> StoredEvent {
        StoredEvent {
            seq: 7,
            record: EventRecord {
                digest: Some("sha256:ab".into()),
                tag: Some("v1".into()),
                media_type: Some("application/vnd.oci.image.manifest.v1+json".into()),
                size: Some(42),
                time_ms: 1_700_000_000_123,
                ..EventRecord::new(EventKind::Push, "p/app")
            },
        }
    }

    fn body(f: NotifyFormat, ev: &StoredEvent) -> Value {
        serde_json::from_slice(&render(f, "reg.example", "inst", ev).unwrap().bytes).unwrap()
    }

    #[test]
    fn distribution_envelope() {
        let v = body(NotifyFormat::Distribution, &push());
        let e = &v["events"][0];
        assert_eq!(e["id"], "inst-0000000000000007");
        assert_eq!(e["action"], "push");
        assert_eq!(e["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(e["target"]["repository"], "p/app");
        assert_eq!(e["target"]["digest"], "sha256:ab");
        assert_eq!(e["target"]["tag"], "v1");
        assert_eq!(e["target"]["size"], 42);
        assert_eq!(
            e["target"]["url"],
            "http://reg.example/v2/p/app/manifests/sha256:ab"
        );
    }

    #[test]
    fn cloudevent_structured() {
        let v = body(NotifyFormat::Cloudevents, &push());
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["id"], "inst-0000000000000007");
        assert_eq!(v["type"], "dev.transship.push");
        assert_eq!(v["subject"], "p/app:v1");
        assert_eq!(v["data"]["digest"], "sha256:ab");
    }

    #[test]
    fn gcr_messages() {
        let v = body(NotifyFormat::Gcr, &push());
        assert_eq!(
            v,
            json!({"action":"INSERT","digest":"reg.example/p/app@sha256:ab","tag":"reg.example/p/app:v1"})
        );
        let mut del = push();
        del.record.action = EventKind::Delete;
        del.record.tag = None;
        assert_eq!(
            body(NotifyFormat::Gcr, &del),
            json!({"action":"DELETE","digest":"reg.example/p/app@sha256:ab"})
        );
        let mut pull = push();
        pull.record.action = EventKind::Pull;
        assert!(render(NotifyFormat::Gcr, "h", "i", &pull).is_none());
    }

    #[test]
    fn signature_is_rfc4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
