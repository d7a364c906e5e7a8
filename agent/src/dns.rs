//! The DNS proxy's pure core: what a pod asked ([`check_query`]), what the answer taught
//! ([`learn_answer`]), and the learned addresses with their TTLs ([`cache::NameCache`]). Wire
//! format by `hickory-proto`; nothing here does I/O, so it is tested without root (and fuzzed:
//! no message, however malformed, panics or loops).
//!
//! The proxy forwards a query it allows byte for byte and returns the answer byte for byte: it
//! only reads them. It builds a message of its own only to refuse (REFUSED, or NXDOMAIN by
//! option) or to fail (SERVFAIL when the upstream does not answer in time).

pub mod cache;
pub mod proxy;

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{RData, RecordType};

use crate::policy::DnsAllow;
use crate::policy::fqdn::normalize_name;

/// The largest DNS message over UDP the proxy reads (EDNS payloads above this are clipped by
/// the upstream, which then sets TC and the client retries over TCP).
pub const MAX_UDP_MESSAGE: usize = 4096;

/// How far a CNAME chain is followed inside one answer (resolvers stop at 8-16).
pub const MAX_CNAME_CHAIN: usize = 16;

/// The one question of a query, normalized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Question {
    pub id: u16,
    /// Lowercase, no trailing dot.
    pub name: String,
    pub qtype: RecordType,
}

/// What to do with a query from a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum QueryVerdict {
    /// Forward it unchanged.
    Forward(Question),
    /// Answer the pod with this message (REFUSED or NXDOMAIN) and log a DROPPED flow.
    Refuse { question: Question, reply: Vec<u8> },
    /// Not a query we can read (no header, not a query, not exactly one question): dropped
    /// without an answer, as a resolver would (the client times out and retries).
    Drop,
}

/// How a refused name is answered.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RefuseWith {
    #[default]
    Refused,
    NxDomain,
}

/// Decides on a query from a pod whose names are limited by `allow`.
#[must_use]
pub fn check_query(bytes: &[u8], allow: &DnsAllow, refuse_with: RefuseWith) -> QueryVerdict {
    let Ok(msg) = Message::from_vec(bytes) else {
        return QueryVerdict::Drop;
    };
    if msg.metadata.message_type != MessageType::Query
        || msg.metadata.op_code != OpCode::Query
        || msg.queries.len() != 1
    {
        return QueryVerdict::Drop;
    }
    let q = &msg.queries[0];
    let question = Question {
        id: msg.metadata.id,
        name: normalize_name(&q.name().to_ascii()),
        qtype: q.query_type(),
    };
    if allow.allows(&question.name) {
        return QueryVerdict::Forward(question);
    }
    let code = match refuse_with {
        RefuseWith::Refused => ResponseCode::Refused,
        RefuseWith::NxDomain => ResponseCode::NXDomain,
    };
    match reply(&msg, code) {
        Some(reply) => QueryVerdict::Refuse { question, reply },
        None => QueryVerdict::Drop,
    }
}

/// A reply to `query` with `code` and no records (its question echoed, recursion desired
/// copied, as resolvers do).
fn reply(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut m = Message::error_msg(query.metadata.id, query.metadata.op_code, code);
    m.metadata.recursion_desired = query.metadata.recursion_desired;
    m.metadata.recursion_available = true;
    m.add_queries(query.queries.clone());
    m.to_vec().ok()
}

/// A SERVFAIL for a query (the upstream did not answer in time); `None` when the query has no
/// readable header.
#[must_use]
pub fn servfail(query: &[u8]) -> Option<Vec<u8>> {
    let msg = Message::from_vec(query).ok()?;
    reply(&msg, ResponseCode::ServFail)
}

/// What an upstream answer carries for the question asked.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Answer {
    pub id: u16,
    pub rcode: u16,
    pub truncated: bool,
    /// The names of the CNAME chain from the question (the question first).
    pub names: Vec<String>,
    /// Each address of the chain's end with its TTL (the smallest along the chain).
    pub addresses: Vec<(IpAddr, u32)>,
}

/// Reads an upstream answer to `question`. Follows CNAMEs from the question's name through the
/// answer section (at most [`MAX_CNAME_CHAIN`] steps), and takes the A and AAAA records of
/// every name on the chain. `None` for a message that does not parse or is not a response.
#[must_use]
pub fn learn_answer(bytes: &[u8], question: &str) -> Option<Answer> {
    let msg = Message::from_vec(bytes).ok()?;
    if msg.metadata.message_type != MessageType::Response {
        return None;
    }
    let mut answer = Answer {
        id: msg.metadata.id,
        rcode: u16::from(msg.metadata.response_code),
        truncated: msg.metadata.truncation,
        names: vec![question.to_owned()],
        addresses: Vec::new(),
    };
    // The chain, with the smallest TTL seen to reach each name.
    let mut chain: Vec<(String, u32)> = vec![(question.to_owned(), u32::MAX)];
    for _ in 0..MAX_CNAME_CHAIN {
        let (current, ttl) = chain.last().cloned().unwrap_or_default();
        let next = msg.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if normalize_name(&r.name.to_ascii()) == current => {
                Some((normalize_name(&target.0.to_ascii()), ttl.min(r.ttl)))
            }
            _ => None,
        });
        match next {
            Some(n) if !chain.iter().any(|(c, _)| *c == n.0) => chain.push(n),
            _ => break,
        }
    }
    for r in &msg.answers {
        let owner = normalize_name(&r.name.to_ascii());
        let Some((_, chain_ttl)) = chain.iter().find(|(c, _)| *c == owner) else {
            continue;
        };
        let ip = match &r.data {
            RData::A(a) => IpAddr::V4(a.0),
            RData::AAAA(a) => IpAddr::V6(a.0),
            _ => continue,
        };
        answer.addresses.push((ip, r.ttl.min(*chain_ttl)));
    }
    answer.names = chain.into_iter().map(|(n, _)| n).collect();
    Some(answer)
}

/// A query for `name`/`qtype` with `id` (for tests and the benchmark client).
#[must_use]
pub fn query(id: u16, name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    if let Ok(n) = hickory_proto::rr::Name::from_ascii(name) {
        m.add_query(Query::query(n, qtype));
    }
    m.to_vec().unwrap_or_default()
}

#[cfg(test)]
mod tests;
