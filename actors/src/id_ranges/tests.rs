use super::*;

use futures::FutureExt;

fn id(secs: u32, n: u64) -> ObjectId {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&secs.to_be_bytes());
    b[4..].copy_from_slice(&n.to_be_bytes());
    ObjectId::from_bytes(b)
}

fn contains(r: &IdRange, x: &ObjectId) -> bool {
    r.after.is_none_or(|a| *x > a) && *x <= r.upto
}

/// Ids of a fake organisation created at second 1,000: a few minted before
/// (imported), most spread over the following hour, in `_id` order.
fn ids() -> Vec<ObjectId> {
    let mut v: Vec<ObjectId> = (0..5).map(|n| id(10 + n as u32, n)).collect();
    v.extend((0..3000u64).map(|n| id(1_000 + (n * 7 % 3600) as u32, n)));
    v.sort();
    v
}

#[test]
fn ranges_cover_the_selection_exactly_once_and_in_order() {
    let floor = id(1_000, 0);
    let upto = id(4_700, u64::MAX);
    for after in [
        None,
        Some(id(500, 0)),
        Some(ids()[1234]),
        Some(id(4_599, 3)),
    ] {
        for parts in [1, 2, 3, 8, 50] {
            let ranges = split(after, upto, floor, parts);
            assert!(
                !ranges.is_empty() && ranges.len() <= parts + 1,
                "{ranges:?}"
            );
            assert_eq!(ranges[0].after, after);
            assert_eq!(ranges.last().map(|r| r.upto), Some(upto));
            for w in ranges.windows(2) {
                assert_eq!(Some(w[0].upto), w[1].after, "contiguous");
                assert!(w[0].after.is_none_or(|a| a < w[0].upto), "not empty");
            }
            for x in ids() {
                let hits = ranges.iter().filter(|r| contains(r, &x)).count();
                let wanted = after.is_none_or(|a| x > a) && x <= upto;
                assert_eq!(hits, usize::from(wanted), "{x} in {ranges:?}");
            }
        }
    }
}

#[test]
fn the_seconds_of_the_organisation_are_cut_evenly() {
    let ranges = split(None, id(4_600, u64::MAX), id(1_000, 0), 8);
    // One range before the organisation (minus the skew), one for the skew
    // and the first second, then 6 spans.
    assert_eq!(ranges.len(), 8, "{ranges:?}");
    assert_eq!(seconds(&ranges[0].upto), 1_000 - SKEW_SECS);
    assert_eq!(seconds(&ranges[1].upto), 1_000);
    let spans: Vec<u32> = ranges[2..]
        .iter()
        .map(|r| seconds(&r.upto) - r.after.map_or(0, |a| seconds(&a)))
        .collect();
    let (min, max) = (spans.iter().min(), spans.iter().max());
    assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{spans:?}");
}

#[test]
fn a_selection_within_one_second_or_past_its_end_is_one_range_or_none() {
    let upto = id(2_000, u64::MAX);
    // Created a minute after the snapshot's second (skew): nothing to cut.
    assert_eq!(
        split(None, upto, id(2_000 + SKEW_SECS, 0), 8),
        vec![IdRange { after: None, upto }]
    );
    let after = Some(id(2_000, 5));
    assert_eq!(
        split(after, upto, id(1_000, 0), 8),
        vec![IdRange { after, upto }]
    );
    assert!(split(Some(upto), upto, id(1, 0), 8).is_empty());
    // An organisation id from the future: still all of it, in one range.
    assert_eq!(
        split(None, upto, id(9_000, 0), 8),
        vec![IdRange { after: None, upto }]
    );
}

/// A reader over `data` (sorted), each range answered from memory in
/// batches of `batch`; ranges in `fail` answer one row and then an error.
fn reader(
    data: Vec<ObjectId>,
    ranges: Vec<IdRange>,
    batch: usize,
    ahead: usize,
    fail: Option<IdRange>,
) -> RangeReader<Vec<ObjectId>> {
    let data = std::sync::Arc::new(data);
    RangeReader::new(
        ranges,
        ahead,
        Box::new(move |range: IdRange| {
            let data = data.clone();
            async move {
                let rows: Vec<ObjectId> = data
                    .iter()
                    .filter(|x| contains(&range, x))
                    .copied()
                    .collect();
                let batches: Vec<Result<Vec<ObjectId>, JobError>> = if fail == Some(range) {
                    vec![
                        Ok(rows.into_iter().take(1).collect()),
                        Err(JobError::Internal("cursor lost".into())),
                    ]
                } else {
                    rows.chunks(batch).map(|c| Ok(c.to_vec())).collect()
                };
                Ok(futures::stream::iter(batches).boxed())
            }
            .boxed()
        }),
    )
}

async fn drain(r: &mut RangeReader<Vec<ObjectId>>, batch: usize) -> Vec<ObjectId> {
    let mut out = Vec::new();
    while let Some(b) = r.next().await.expect("no error") {
        assert!(!b.is_empty() && b.len() <= batch);
        out.extend(b);
    }
    out
}

#[tokio::test]
async fn rows_come_out_in_id_order_whatever_the_read_ahead() {
    let data = ids();
    for (parts, batch, ahead) in [(1, 1000, 0), (8, 100, 1), (8, 7, 3), (50, 64, 2)] {
        let ranges = split(None, id(4_700, u64::MAX), id(1_000, 0), parts);
        let mut r = reader(data.clone(), ranges, batch, ahead, None);
        assert_eq!(drain(&mut r, batch).await, data, "{parts} {batch} {ahead}");
        assert_eq!(r.ranges_left(), 0);
        assert!(r.next().await.expect("still fine").is_none());
    }
}

#[tokio::test]
async fn a_resume_in_the_middle_of_a_range_reads_exactly_what_follows() {
    let data = ids();
    let upto = id(4_700, u64::MAX);
    for cut in [0, 1, 4, 5, 1717, data.len() - 1] {
        let after = data[cut];
        let ranges = split(Some(after), upto, id(1_000, 0), 8);
        let mut r = reader(data.clone(), ranges, 100, 1, None);
        assert_eq!(
            drain(&mut r, 100).await,
            data[cut + 1..].to_vec(),
            "after {cut}"
        );
    }
}

#[tokio::test]
async fn a_failed_range_stops_the_reader_rather_than_skip_rows() {
    let data = ids();
    let ranges = split(None, id(4_700, u64::MAX), id(1_000, 0), 8);
    let bad = ranges[3];
    let mut r = reader(data.clone(), ranges, 100, 1, Some(bad));
    let mut got = Vec::new();
    let err = loop {
        match r.next().await {
            Ok(b) => got.extend(b.expect("ended without the error")),
            Err(e) => break e,
        }
    };
    assert!(err.to_string().contains("cursor lost"), "{err}");
    assert!(r.next().await.is_err(), "nothing after a failure");
    // What came out is a prefix: resuming after its last row loses nothing.
    assert_eq!(got, data[..got.len()].to_vec());
    let ranges = split(got.last().copied(), id(4_700, u64::MAX), id(1_000, 0), 8);
    let mut again = reader(data.clone(), ranges, 100, 1, None);
    got.extend(drain(&mut again, 100).await);
    assert_eq!(got, data);
}
