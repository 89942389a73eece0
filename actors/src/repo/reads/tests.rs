//! Unit tests of the use cases' reads on the fakes: counts and dry runs of a
//! selection, the streamed export's documents, and the name cache's lookups.

use bson::{doc, oid::ObjectId};
use futures::TryStreamExt;

use crate::error::JobError;
use crate::filter::Filter;
use crate::lookup::NameCache;
use crate::model::Counts;
use crate::repo::{ContactReads, MemCrm, MemReads, PipelineNames};

const CONTACTS: &str = "contacts";

/// `n` contacts of `org` in `stage`, each with one conversation and two messages.
fn add(crm: &MemCrm, org: ObjectId, stage: ObjectId, n: usize) -> Vec<ObjectId> {
    (0..n)
        .map(|_| {
            let id = ObjectId::new();
            crm.insert_contact(
                CONTACTS,
                doc! {"_id": id, "orgId": org, "stageId": stage, "firstName": "A", "email": "a@x"},
            );
            crm.insert_child(
                true,
                doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id},
            );
            for _ in 0..2 {
                crm.insert_child(
                    false,
                    doc! {"_id": ObjectId::new(), "orgId": org, "contactId": id},
                );
            }
            id
        })
        .collect()
}

fn in_stage(stage: ObjectId) -> Filter {
    Filter {
        stage_ids: vec![stage],
        ..Filter::default()
    }
}

#[tokio::test]
async fn counts_and_delete_dry_runs_see_only_the_selection_of_the_organisation() {
    let reads = MemReads::new(MemCrm::new());
    let (org, other) = (ObjectId::new(), ObjectId::new());
    let (stage, elsewhere) = (ObjectId::new(), ObjectId::new());
    add(&reads.crm, org, stage, 7);
    add(&reads.crm, org, elsewhere, 2);
    add(&reads.crm, other, stage, 5);
    assert_eq!(reads.count(org, &in_stage(stage)).await.unwrap(), 7);
    let capped = Filter {
        limit: Some(3),
        ..in_stage(stage)
    };
    assert_eq!(reads.count(org, &capped).await.unwrap(), 3);
    let whole = Filter {
        org_wide: true,
        ..Filter::default()
    };
    assert_eq!(reads.count(org, &whole).await.unwrap(), 9);
    let counts = reads.delete_dry_run(org, &in_stage(stage)).await.unwrap();
    assert_eq!(
        counts,
        Counts {
            contacts: 7,
            conversations: 7,
            messages: 14
        }
    );
    // A dry run deletes nothing.
    assert_eq!(reads.count(other, &in_stage(stage)).await.unwrap(), 5);
    assert_eq!(reads.crm.contact_ids(CONTACTS).len(), 14);
}

#[tokio::test]
async fn streamed_documents_are_projected_in_id_order_and_capped() {
    let reads = MemReads::new(MemCrm::new());
    let (org, stage) = (ObjectId::new(), ObjectId::new());
    let mut ids = add(&reads.crm, org, stage, 5);
    add(&reads.crm, ObjectId::new(), stage, 5);
    ids.sort();
    let filter = Filter {
        limit: Some(4),
        ..in_stage(stage)
    };
    let docs: Vec<_> = reads
        .documents(org, &filter, doc! {"firstName": 1}, 2)
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let got: Vec<ObjectId> = docs
        .iter()
        .map(|d| d.get_object_id("_id").unwrap())
        .collect();
    assert_eq!(got, ids[..4]);
    assert!(docs.iter().all(|d| d.get_str("firstName") == Ok("A")));
    assert!(docs.iter().all(|d| !d.contains_key("email")), "projected");
}

#[tokio::test]
async fn an_unreachable_database_is_an_outage_not_a_zero() {
    let reads = MemReads::new(MemCrm::new());
    reads.set_down(true);
    let org = ObjectId::new();
    let r = reads.count(org, &in_stage(ObjectId::new())).await;
    assert!(matches!(r, Err(JobError::Unavailable { .. })), "{r:?}");
    assert!(reads.ping().await.is_err());
    reads.set_down(false);
    reads.ping().await.unwrap();
}

#[tokio::test]
async fn names_are_looked_up_once_per_batch_and_misses_are_remembered() {
    let reads = MemReads::new(MemCrm::new());
    let (org, other) = (ObjectId::new(), ObjectId::new());
    let (pipe, stage, ghost) = (ObjectId::new(), ObjectId::new(), ObjectId::new());
    reads.add_pipeline(
        org,
        PipelineNames {
            id: pipe,
            name: "Sales".into(),
            stages: vec![(stage, "Won".into())],
        },
    );
    let owner = ObjectId::new();
    reads.add_user(org, owner, "Ann");
    let foreign = ObjectId::new();
    reads.add_user(other, foreign, "Eve");
    let docs = [
        doc! {"pipelineId": pipe, "stageId": stage, "ownerId": owner},
        doc! {"stageId": ghost, "ownerId": foreign},
    ];
    let mut cache = NameCache::default();
    cache
        .resolve(&reads, org, docs.iter(), true, true)
        .await
        .unwrap();
    assert_eq!(
        reads.name_queries(),
        (1, 1),
        "one query per kind for the batch"
    );
    assert_eq!(
        cache.names.pipelines.get(&pipe).map(String::as_str),
        Some("Sales")
    );
    assert_eq!(
        cache.names.stages.get(&stage).map(String::as_str),
        Some("Won")
    );
    assert_eq!(
        cache.names.owners.get(&owner).map(String::as_str),
        Some("Ann")
    );
    assert!(
        !cache.names.owners.contains_key(&foreign),
        "another organisation's user"
    );
    // Known and missing ids cost nothing on the next batch.
    cache
        .resolve(&reads, org, docs.iter(), true, true)
        .await
        .unwrap();
    assert_eq!(reads.name_queries(), (1, 1));
}
