//! Data generation for the demo organisation, benchmarks and manual testing:
//! pipelines, users, contacts, conversations and messages, bulk-inserted in
//! chunks so memory stays flat whatever the size.

use bson::{doc, oid::ObjectId, Bson, DateTime, Document};
use mongodb::Database;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const FIRST: [&str; 12] = [
    "Alex", "Morgan", "Sam", "Taylor", "Jordan", "Riley", "Chloé", "Noah", "Aisha", "Mateo",
    "Yuki", "Olga",
];
const LAST: [&str; 12] = [
    "Smith", "Nguyen", "García", "O'Brien", "Kowalski", "Okafor", "Tanaka", "Müller", "Rossi",
    "Singh", "Dubois", "Lee",
];
const TAGS: [&str; 5] = ["vip", "newsletter", "lead", "partner", "cold"];
const SOURCES: [&str; 4] = ["web", "referral", "event", "import"];
const CHUNK: usize = 5_000;

/// What to generate.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// Contacts to insert.
    pub contacts: u64,
    /// Pipelines.
    pub pipelines: usize,
    /// Stages per pipeline.
    pub stages_per_pipeline: usize,
    /// Users (assignees).
    pub users: usize,
    /// Every n-th contact has conversations (0 = none).
    pub conversation_every: u64,
    /// Conversations of such a contact.
    pub conversations_per_contact: u32,
    /// Messages per conversation.
    pub messages_per_conversation: u32,
    /// Random seed (deterministic output).
    pub seed: u64,
    /// Target collection (`contacts` or `applications`).
    pub collection: &'static str,
}

impl SeedSpec {
    /// The demo organisation of `contact-bulk dev`.
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

/// What was seeded.
#[derive(Debug, Clone)]
pub struct SeededOrg {
    /// The organisation.
    pub org_id: ObjectId,
    /// Its pipelines.
    pub pipeline_ids: Vec<ObjectId>,
    /// Every stage, pipeline by pipeline.
    pub stage_ids: Vec<ObjectId>,
    /// Its users.
    pub user_ids: Vec<ObjectId>,
}

/// Inserts pipelines, users, contacts and their conversations and messages for `org_id`.
pub async fn seed_org(
    db: &Database,
    org_id: ObjectId,
    spec: &SeedSpec,
) -> anyhow::Result<SeededOrg> {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let names = ["Sales", "Admissions", "Partners", "Support"];
    let stage_names = [
        "New Lead",
        "Contacted",
        "Qualified",
        "Proposal",
        "Won",
        "Lost",
    ];
    let mut pipeline_ids = Vec::new();
    let mut stages: Vec<(ObjectId, ObjectId)> = Vec::new();
    let mut pipelines = Vec::new();
    for p in 0..spec.pipelines.max(1) {
        let pid = ObjectId::new();
        let st: Vec<Document> = (0..spec.stages_per_pipeline.max(1))
            .map(|s| {
                let sid = ObjectId::new();
                stages.push((pid, sid));
                doc! {"_id": sid, "name": stage_names[s % stage_names.len()]}
            })
            .collect();
        pipeline_ids.push(pid);
        pipelines
            .push(doc! {"_id": pid, "orgId": org_id, "name": names[p % names.len()], "stages": st});
    }
    db.collection::<Document>("pipelines")
        .insert_many(pipelines)
        .await?;
    let user_ids: Vec<ObjectId> = (0..spec.users).map(|_| ObjectId::new()).collect();
    if !user_ids.is_empty() {
        let users: Vec<Document> = user_ids
            .iter()
            .enumerate()
            .map(|(i, u)| {
                let name = format!("{} {}", FIRST[i % FIRST.len()], LAST[(i + 3) % LAST.len()]);
                doc! {"_id": u, "orgId": org_id, "name": &name, "email": format!("user{i}@example.com")}
            })
            .collect();
        db.collection::<Document>("users")
            .insert_many(users)
            .await?;
    }
    let contacts = db.collection::<Document>(spec.collection);
    let conversations = db.collection::<Document>("conversations");
    let messages = db.collection::<Document>("messages");
    let start = DateTime::parse_rfc3339_str("2025-01-01T00:00:00Z")?.timestamp_millis();
    let span = 2 * 365 * 24 * 3600 * 1000i64;
    let mut i = 0u64;
    while i < spec.contacts {
        let n = (spec.contacts - i).min(CHUNK as u64);
        let mut batch = Vec::with_capacity(n as usize);
        let mut convs = Vec::new();
        let mut msgs = Vec::new();
        for k in i..i + n {
            let id = ObjectId::new();
            let (pid, sid) = stages[(k as usize) % stages.len()];
            let first = FIRST[rng.random_range(0..FIRST.len())];
            let last = LAST[rng.random_range(0..LAST.len())];
            let owner = if !user_ids.is_empty() && rng.random_range(0..10) < 7 {
                Bson::ObjectId(user_ids[(k as usize) % user_ids.len()])
            } else {
                Bson::Null
            };
            let tags: Vec<&str> = TAGS
                .iter()
                .copied()
                .filter(|_| rng.random_range(0..4) == 0)
                .collect();
            batch.push(doc! {
                "_id": id, "orgId": org_id,
                "firstName": first, "lastName": last,
                "phone": format!("+1416555{:04}", k % 10_000),
                "email": format!("{}.{}{k}@example.com", first.to_lowercase(), last.to_lowercase().replace('\'', "")),
                "pipelineId": pid, "stageId": sid, "ownerId": owner, "tags": tags,
                "customFields": {"source": SOURCES[(k as usize) % SOURCES.len()], "score": (k % 100) as i32},
                "createdAt": DateTime::from_millis(start + rng.random_range(0..span)),
            });
            if spec.conversation_every > 0 && k % spec.conversation_every == 0 {
                for _ in 0..spec.conversations_per_contact {
                    let cid = ObjectId::new();
                    convs.push(
                        doc! {"_id": cid, "orgId": org_id, "contactId": id, "channel": "sms"},
                    );
                    for m in 0..spec.messages_per_conversation {
                        msgs.push(
                            doc! {"_id": ObjectId::new(), "orgId": org_id, "conversationId": cid,
                            "contactId": id, "body": format!("message {m}")},
                        );
                    }
                }
            }
        }
        contacts.insert_many(batch).await?;
        for chunk in convs.chunks(CHUNK) {
            conversations.insert_many(chunk.to_vec()).await?;
        }
        for chunk in msgs.chunks(CHUNK) {
            messages.insert_many(chunk.to_vec()).await?;
        }
        i += n;
    }
    Ok(SeededOrg {
        org_id,
        pipeline_ids,
        stage_ids: stages.iter().map(|(_, s)| *s).collect(),
        user_ids,
    })
}

/// Seeds a demo organisation described by `spec` when `contacts` is empty.
pub async fn seed_demo_if_empty_with(
    db: &Database,
    spec: &SeedSpec,
) -> anyhow::Result<Option<SeededOrg>> {
    let existing = db
        .collection::<Document>("contacts")
        .estimated_document_count()
        .await?;
    if existing > 0 {
        return Ok(None);
    }
    Ok(Some(seed_org(db, ObjectId::new(), spec).await?))
}

/// The organisation of the first contact, if any.
pub async fn first_org(db: &Database) -> anyhow::Result<Option<ObjectId>> {
    let c = db
        .collection::<Document>("contacts")
        .find_one(doc! {})
        .await?;
    Ok(c.and_then(|c| c.get_object_id("orgId").ok()))
}

/// The first user of `org`, if any.
pub async fn first_user(db: &Database, org: ObjectId) -> anyhow::Result<Option<ObjectId>> {
    let u = db
        .collection::<Document>("users")
        .find_one(doc! {"orgId": org})
        .await?;
    Ok(u.and_then(|u| u.get_object_id("_id").ok()))
}
