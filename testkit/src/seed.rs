//! Data generation for the demo organisation, the tests and the benchmarks:
//! pipelines, users, contacts (or applications), conversations and messages.
//!
//! Documents are generated chunk by chunk and bulk-inserted with `insert_many`
//! ([`CHUNK`] documents per call, never one per round trip), so memory stays
//! flat whatever the size. Field values are deterministic for a given
//! [`SeedSpec::seed`]; the `_id`s are fresh `ObjectId`s, so the same spec can
//! seed several organisations into one database.

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::{Collection, Database};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Documents per `insert_many`.
pub const CHUNK: usize = 5_000;

const FIRST: [&str; 16] = [
    "Alex", "Morgan", "Sam", "Taylor", "Jordan", "Riley", "Chloé", "Noah", "Aisha", "Mateo",
    "Yuki", "Olga", "Priya", "Liam", "Zoë", "Kwame",
];
const LAST: [&str; 16] = [
    "Smith",
    "Nguyen",
    "García",
    "O'Brien",
    "Kowalski",
    "Okafor",
    "Tanaka",
    "Müller",
    "Rossi",
    "Singh",
    "Dubois",
    "Lee",
    "Martin",
    "Cohen",
    "Silva",
    "Johansson",
];
const TAGS: [&str; 6] = ["vip", "newsletter", "lead", "partner", "cold", "event-2025"];
const SOURCES: [&str; 5] = ["web", "referral", "event", "import", "ads"];
const PIPELINES: [&str; 4] = ["Sales", "Admissions", "Partners", "Support"];
const STAGES: [&str; 6] = [
    "New Lead",
    "Contacted",
    "Qualified",
    "Proposal",
    "Won",
    "Lost",
];
const MESSAGES: [&str; 4] = [
    "Hi! Thanks for reaching out.",
    "Could you send me the brochure?",
    "Sure, here it is: https://example.com/brochure.pdf",
    "Let's talk on Monday.",
];
/// 2025-01-01T00:00:00Z.
const CREATED_FROM_MS: i64 = 1_735_689_600_000;
/// Two years: `createdAt` is spread over 2025 and 2026.
const CREATED_SPAN_MS: i64 = 730 * 24 * 3600 * 1000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// Contacts (or applications) to insert.
    pub contacts: u64,
    /// Pipelines (at least 1 is created).
    pub pipelines: usize,
    /// Stages per pipeline (at least 1 is created).
    pub stages_per_pipeline: usize,
    /// Users (contact owners); 0 = every contact unowned.
    pub users: usize,
    /// Every n-th contact (the 0th, the n-th, ...) has conversations; 0 = none, 1 = all.
    pub conversation_every: u64,
    /// Conversations of such a contact.
    pub conversations_per_contact: u32,
    /// Messages per conversation.
    pub messages_per_conversation: u32,
    /// Random seed: same seed, same field values.
    pub seed: u64,
    /// Target collection: `contacts` or `applications` (same schema).
    pub collection: &'static str,
}

impl SeedSpec {
    /// The demo organisation of `contact-bulk dev`: 20,000 contacts, 2
    /// pipelines × 4 stages, 5 users, 1 conversation with 3 messages for every
    /// 4th contact.
    pub fn demo() -> SeedSpec {
        SeedSpec {
            contacts: 20_000,
            pipelines: 2,
            stages_per_pipeline: 4,
            users: 5,
            conversation_every: 4,
            conversations_per_contact: 1,
            messages_per_conversation: 3,
            seed: 7,
            collection: "contacts",
        }
    }
}

impl Default for SeedSpec {
    /// [`SeedSpec::demo`].
    fn default() -> SeedSpec {
        SeedSpec::demo()
    }
}

/// What was seeded.
#[derive(Debug, Clone)]
pub struct SeededOrg {
    /// The organisation.
    pub org_id: ObjectId,
    /// Its pipelines.
    pub pipeline_ids: Vec<ObjectId>,
    /// Every stage, pipeline by pipeline (`stages_per_pipeline` per pipeline).
    pub stage_ids: Vec<ObjectId>,
    /// Its users.
    pub user_ids: Vec<ObjectId>,
}

/// Inserts pipelines, users, then the contacts of `org_id` into
/// `spec.collection` with their conversations and messages.
///
/// Contact `k` is in stage `k % stages` (round-robin over every stage of every
/// pipeline, `pipelineId` matching); about 70% are owned, round-robin over the
/// users, the rest have `ownerId: null`; tags come from a small vocabulary
/// (vip, newsletter, lead, ...); `customFields` holds `source` (string),
/// `score` (int) and `optIn` (bool); `createdAt` is spread over 2025-2026.
pub async fn seed_org(
    db: &Database,
    org_id: ObjectId,
    spec: &SeedSpec,
) -> anyhow::Result<SeededOrg> {
    let mut rng = StdRng::seed_from_u64(spec.seed);

    let mut pipeline_ids = Vec::new();
    let mut stages: Vec<(ObjectId, ObjectId)> = Vec::new();
    let mut pipelines = Vec::new();
    for p in 0..spec.pipelines.max(1) {
        let pipeline_id = ObjectId::new();
        let stage_docs: Vec<Document> = (0..spec.stages_per_pipeline.max(1))
            .map(|s| {
                let stage_id = ObjectId::new();
                stages.push((pipeline_id, stage_id));
                doc! {"_id": stage_id, "name": cycle(&STAGES, s)}
            })
            .collect();
        pipeline_ids.push(pipeline_id);
        let name = match p / PIPELINES.len() {
            0 => cycle(&PIPELINES, p).to_string(),
            round => format!("{} {}", cycle(&PIPELINES, p), round + 1),
        };
        pipelines
            .push(doc! {"_id": pipeline_id, "orgId": org_id, "name": name, "stages": stage_docs});
    }
    insert_chunked(&db.collection("pipelines"), &mut pipelines, 0).await?;

    let user_ids: Vec<ObjectId> = (0..spec.users).map(|_| ObjectId::new()).collect();
    let mut users: Vec<Document> = user_ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (first, last) = (cycle(&FIRST, i), cycle(&LAST, i + 5));
            doc! {
                "_id": id,
                "orgId": org_id,
                "name": format!("{first} {last}"),
                "email": format!("{}.{}{i}@crm.example.com", ascii_lower(first), ascii_lower(last)),
            }
        })
        .collect();
    insert_chunked(&db.collection("users"), &mut users, 0).await?;

    let contacts: Collection<Document> = db.collection(spec.collection);
    let conversations: Collection<Document> = db.collection("conversations");
    let messages: Collection<Document> = db.collection("messages");
    let mut contact_buf = Vec::with_capacity(CHUNK);
    let mut conversation_buf = Vec::with_capacity(CHUNK);
    let mut message_buf = Vec::with_capacity(CHUNK);
    for k in 0..spec.contacts {
        let contact_id = ObjectId::new();
        let i = usize::try_from(k).unwrap_or(usize::MAX);
        let (pipeline_id, stage_id) = stages[i % stages.len()];
        let first = FIRST[rng.random_range(0..FIRST.len())];
        let last = LAST[rng.random_range(0..LAST.len())];
        let owned = rng.random_range(0..10) < 7;
        let owner = match (owned, user_ids.is_empty()) {
            (true, false) => Bson::ObjectId(user_ids[i % user_ids.len()]),
            _ => Bson::Null,
        };
        let tags: Vec<&str> = TAGS
            .iter()
            .copied()
            .filter(|_| rng.random_range(0..4) == 0)
            .collect();
        let created_at =
            DateTime::from_millis(CREATED_FROM_MS + rng.random_range(0..CREATED_SPAN_MS));
        contact_buf.push(doc! {
            "_id": contact_id,
            "orgId": org_id,
            "firstName": first,
            "lastName": last,
            "phone": format!("+1416555{:04}", k % 10_000),
            "email": format!("{}.{}{k}@example.com", ascii_lower(first), ascii_lower(last)),
            "pipelineId": pipeline_id,
            "stageId": stage_id,
            "ownerId": owner,
            "tags": tags,
            "customFields": {
                "source": SOURCES[rng.random_range(0..SOURCES.len())],
                "score": rng.random_range(0..100i32),
                "optIn": rng.random_bool(0.5),
            },
            "createdAt": created_at,
        });
        // Contacts first, so a conversation never points at a contact not yet inserted.
        insert_chunked(&contacts, &mut contact_buf, CHUNK).await?;

        if spec.conversation_every > 0 && k % spec.conversation_every == 0 {
            for _ in 0..spec.conversations_per_contact {
                let conversation_id = ObjectId::new();
                conversation_buf.push(doc! {
                    "_id": conversation_id,
                    "orgId": org_id,
                    "contactId": contact_id,
                    "channel": "sms",
                    "createdAt": created_at,
                });
                for m in 0..spec.messages_per_conversation {
                    let direction = if m % 2 == 0 { "inbound" } else { "outbound" };
                    message_buf.push(doc! {
                        "_id": ObjectId::new(),
                        "orgId": org_id,
                        "conversationId": conversation_id,
                        "contactId": contact_id,
                        "direction": direction,
                        "body": cycle(&MESSAGES, m as usize),
                        "createdAt": DateTime::from_millis(
                            created_at.timestamp_millis() + i64::from(m) * 60_000,
                        ),
                    });
                    if message_buf.len() >= CHUNK {
                        insert_chunked(&contacts, &mut contact_buf, 0).await?;
                        insert_chunked(&conversations, &mut conversation_buf, 0).await?;
                        insert_chunked(&messages, &mut message_buf, 0).await?;
                    }
                }
                if conversation_buf.len() >= CHUNK {
                    insert_chunked(&contacts, &mut contact_buf, 0).await?;
                    insert_chunked(&conversations, &mut conversation_buf, 0).await?;
                }
            }
        }
    }
    insert_chunked(&contacts, &mut contact_buf, 0).await?;
    insert_chunked(&conversations, &mut conversation_buf, 0).await?;
    insert_chunked(&messages, &mut message_buf, 0).await?;

    Ok(SeededOrg {
        org_id,
        pipeline_ids,
        stage_ids: stages.iter().map(|&(_, stage)| stage).collect(),
        user_ids,
    })
}

/// If `contacts` is empty: seeds an organisation by `spec` (the demo one is
/// [`SeedSpec::demo`]) under a new org id and returns it; else `None`.
pub async fn seed_demo_if_empty_with(
    db: &Database,
    spec: &SeedSpec,
) -> anyhow::Result<Option<SeededOrg>> {
    if first_org(db).await?.is_some() {
        return Ok(None);
    }
    Ok(Some(seed_org(db, ObjectId::new(), spec).await?))
}

/// The organisation of some contact, if there is any contact.
pub async fn first_org(db: &Database) -> anyhow::Result<Option<ObjectId>> {
    let contact = db
        .collection::<Document>("contacts")
        .find_one(doc! {})
        .projection(doc! {"orgId": 1})
        .await?;
    Ok(contact.and_then(|c| c.get_object_id("orgId").ok()))
}

/// Some user of `org`, if it has any.
pub async fn first_user(db: &Database, org: ObjectId) -> anyhow::Result<Option<ObjectId>> {
    let user = db
        .collection::<Document>("users")
        .find_one(doc! {"orgId": org})
        .projection(doc! {"_id": 1})
        .await?;
    Ok(user.and_then(|u| u.get_object_id("_id").ok()))
}

/// Inserts and empties `buf` once it holds at least `min` documents (and is not empty).
async fn insert_chunked(
    coll: &Collection<Document>,
    buf: &mut Vec<Document>,
    min: usize,
) -> anyhow::Result<()> {
    if buf.is_empty() || buf.len() < min {
        return Ok(());
    }
    let docs = std::mem::replace(buf, Vec::with_capacity(CHUNK));
    for chunk in docs.chunks(CHUNK) {
        coll.insert_many(chunk).await?;
    }
    Ok(())
}

fn cycle<'a>(list: &[&'a str], i: usize) -> &'a str {
    list[i % list.len()]
}

/// `Chloé` → `chloe`, `O'Brien` → `obrien`: ASCII for email local parts.
fn ascii_lower(name: &str) -> String {
    name.chars()
        .filter_map(|c| match c.to_ascii_lowercase() {
            'é' | 'É' | 'è' => Some('e'),
            'ü' | 'Ü' => Some('u'),
            'ë' => Some('e'),
            'í' => Some('i'),
            'á' => Some('a'),
            'ö' => Some('o'),
            c if c.is_ascii_alphanumeric() => Some(c),
            _ => None,
        })
        .collect()
}

/// A pipeline with named stages, inserted for `org`; its id.
pub async fn pipeline(
    db: &Database,
    org: ObjectId,
    name: &str,
    stages: &[(ObjectId, &str)],
) -> anyhow::Result<ObjectId> {
    let id = ObjectId::new();
    let stages: Vec<Document> = stages
        .iter()
        .map(|(s, n)| doc! {"_id": s, "name": n})
        .collect();
    db.collection::<Document>("pipelines")
        .insert_one(doc! {"_id": id, "orgId": org, "name": name, "stages": stages})
        .await?;
    Ok(id)
}

/// The `i`-th plain contact of a test (not inserted): predictable names,
/// phone and email, tag `lead`, custom field `source: web`, one minute apart.
pub fn contact(org: ObjectId, pipeline: ObjectId, stage: ObjectId, i: usize) -> Document {
    doc! {
        "_id": ObjectId::new(),
        "orgId": org,
        "firstName": format!("First{i}"),
        "lastName": format!("Last{i}"),
        "phone": format!("+1416555{:04}", i % 10_000),
        "email": format!("person{i}@example.com"),
        "pipelineId": pipeline,
        "stageId": stage,
        "ownerId": Bson::Null,
        "tags": ["lead"],
        "customFields": {"source": "web"},
        "createdAt": DateTime::from_millis(1_767_225_600_000 + i as i64 * 60_000),
    }
}

/// Inserts documents into `coll` in chunks of 2,000.
pub async fn insert(db: &Database, coll: &str, docs: Vec<Document>) -> anyhow::Result<()> {
    for chunk in docs.chunks(2000) {
        db.collection::<Document>(coll)
            .insert_many(chunk.to_vec())
            .await?;
    }
    Ok(())
}
