use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, Record, RecordType, rdata};

use super::*;
use crate::policy::fqdn::FqdnMatch;

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("test name")
}

fn response(qname: &str, records: Vec<Record>) -> Vec<u8> {
    let mut m = Message::response(7, OpCode::Query);
    m.add_query(Query::query(name(qname), RecordType::A));
    for r in records {
        m.add_answer(r);
    }
    m.to_vec().expect("encodes")
}

fn a(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(
        name(owner),
        ttl,
        RData::A(rdata::A(ip.parse().expect("ip"))),
    )
}

fn aaaa(owner: &str, ttl: u32, ip: &str) -> Record {
    Record::from_rdata(
        name(owner),
        ttl,
        RData::AAAA(rdata::AAAA(ip.parse().expect("ip"))),
    )
}

fn cname(owner: &str, ttl: u32, target: &str) -> Record {
    Record::from_rdata(name(owner), ttl, RData::CNAME(rdata::CNAME(name(target))))
}

fn only(patterns: &[&str]) -> DnsAllow {
    DnsAllow::Only(
        patterns
            .iter()
            .map(|p| FqdnMatch::pattern(p, "test").expect("pattern"))
            .collect(),
    )
}

#[test]
fn allowed_queries_are_forwarded_and_others_refused_with_the_question() {
    let q = query(9, "API.example.test.", RecordType::AAAA);
    match check_query(&q, &only(&["*.example.test"]), RefuseWith::Refused) {
        QueryVerdict::Forward(question) => {
            assert_eq!(question.name, "api.example.test");
            assert_eq!(question.qtype, RecordType::AAAA);
            assert_eq!(question.id, 9);
        }
        other => panic!("expected a forward, got {other:?}"),
    }
    for (with, code) in [
        (RefuseWith::Refused, ResponseCode::Refused),
        (RefuseWith::NxDomain, ResponseCode::NXDomain),
    ] {
        let QueryVerdict::Refuse { question, reply } =
            check_query(&q, &only(&["*.example.org"]), with)
        else {
            panic!("expected a refusal");
        };
        assert_eq!(question.name, "api.example.test");
        let reply = Message::from_vec(&reply).expect("reply parses");
        assert_eq!(reply.metadata.id, 9);
        assert_eq!(reply.metadata.response_code, code);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.queries.len(), 1, "the question is echoed");
        assert!(reply.answers.is_empty());
    }
}

#[test]
fn responses_and_questionless_messages_are_not_queries() {
    let r = response("api.example.test", vec![]);
    assert_eq!(
        check_query(&r, &DnsAllow::Any, RefuseWith::Refused),
        QueryVerdict::Drop
    );
    let empty = Message::new(1, MessageType::Query, OpCode::Query)
        .to_vec()
        .expect("encodes");
    assert_eq!(
        check_query(&empty, &DnsAllow::Any, RefuseWith::Refused),
        QueryVerdict::Drop
    );
    assert_eq!(
        check_query(&[], &DnsAllow::Any, RefuseWith::Refused),
        QueryVerdict::Drop
    );
    let servfail = Message::from_vec(&servfail(&query(3, "a.test", RecordType::A)).expect("reply"))
        .expect("parses");
    assert_eq!(servfail.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(servfail.metadata.id, 3);
}

#[test]
fn answers_follow_cname_chains_and_take_the_smallest_ttl() {
    let bytes = response(
        "www.example.test",
        vec![
            cname("www.example.test", 20, "edge.cdn.test"),
            cname("edge.cdn.test", 300, "api.example.test"),
            a("api.example.test", 60, "203.0.113.1"),
            aaaa("api.example.test", 10, "2001:db8::1"),
            a("unrelated.test", 60, "198.51.100.9"),
        ],
    );
    let answer = learn_answer(&bytes, "www.example.test").expect("a response");
    assert_eq!(
        answer.names,
        ["www.example.test", "edge.cdn.test", "api.example.test"]
    );
    assert_eq!(
        answer.addresses,
        [
            ("203.0.113.1".parse().expect("ip"), 20),
            ("2001:db8::1".parse().expect("ip"), 10),
        ],
        "the CNAME's 20 s bounds the A's 60 s; unrelated records are ignored"
    );
    assert_eq!(answer.rcode, 0);
}

#[test]
fn a_cname_loop_ends() {
    let bytes = response(
        "a.test",
        vec![
            cname("a.test", 5, "b.test"),
            cname("b.test", 5, "a.test"),
            a("b.test", 5, "203.0.113.2"),
        ],
    );
    let answer = learn_answer(&bytes, "a.test").expect("a response");
    assert_eq!(answer.names, ["a.test", "b.test"]);
    assert_eq!(answer.addresses.len(), 1);
}

/// Messages that parsers get wrong: a compression pointer to itself, a pointer loop between two
/// names, a name running past the end, a count promising records that are not there.
#[test]
fn hostile_messages_are_rejected() {
    let header = |qd: u8, an: u8| vec![0, 1, 0x81, 0x80, 0, qd, 0, an, 0, 0, 0, 0];
    let mut self_pointer = header(1, 0);
    self_pointer.extend([0xc0, 12, 0, 1, 0, 1]);
    let mut two_pointers = header(1, 0);
    two_pointers.extend([0xc0, 14, 0xc0, 12, 0, 1, 0, 1]);
    let mut past_end = header(1, 0);
    past_end.extend([63, b'a', b'b']);
    let mut missing = header(1, 5);
    missing.extend([1, b'a', 0, 0, 1, 0, 1]);
    for bytes in [self_pointer, two_pointers, past_end, missing] {
        assert_eq!(learn_answer(&bytes, "a"), None, "{bytes:?}");
        assert_eq!(
            check_query(&bytes, &DnsAllow::Any, RefuseWith::Refused),
            QueryVerdict::Drop
        );
    }
}

/// Random and mutated messages through everything the proxy does with a message from a pod or
/// an upstream. The property is the absence of a panic (and the time bound: the loop would
/// hang the test on a parser that loops).
#[test]
fn fuzzed_messages_never_crash_the_parser_path() {
    let seeds = [
        query(1, "api.example.test", RecordType::A),
        query(2, "a.b.c.d.e.f.example.test", RecordType::AAAA),
        response(
            "www.example.test",
            vec![
                cname("www.example.test", 20, "api.example.test"),
                a("api.example.test", 60, "203.0.113.1"),
                aaaa("api.example.test", 60, "2001:db8::1"),
            ],
        ),
    ];
    let allow = only(&["**.example.test"]);
    let mut rng = fastrand::Rng::with_seed(0x6e77_6466);
    let start = std::time::Instant::now();
    for i in 0..50_000u32 {
        let mut bytes = if i % 5 == 0 {
            let len = rng.usize(0..600);
            (0..len).map(|_| rng.u8(..)).collect::<Vec<u8>>()
        } else {
            seeds[rng.usize(..seeds.len())].clone()
        };
        for _ in 0..rng.usize(1..8) {
            if bytes.is_empty() {
                break;
            }
            let at = rng.usize(..bytes.len());
            match rng.u8(0..4) {
                0 => bytes[at] = rng.u8(..),
                1 => bytes[at] ^= 1 << rng.u8(0..8),
                2 => bytes.truncate(at),
                // A compression pointer somewhere.
                _ => {
                    bytes[at] = 0xc0;
                    if at + 1 < bytes.len() {
                        bytes[at + 1] = rng.u8(..);
                    }
                }
            }
        }
        let _ = check_query(&bytes, &allow, RefuseWith::Refused);
        let _ = learn_answer(&bytes, "www.example.test");
        let _ = servfail(&bytes);
    }
    assert!(
        start.elapsed() < std::time::Duration::from_secs(60),
        "50k messages took {:?}",
        start.elapsed()
    );
}
