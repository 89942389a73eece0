//! Every NATS subject of the contract, formatted in one place. The prefix is
//! `bulk` in production (tests may use another).

use std::fmt;

use crate::events::ContactEventType;

/// A request/reply command subject (`<prefix>.v1.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Command {
    /// `bulk.v1.export`.
    Export,
    /// `bulk.v1.delete`.
    Delete,
    /// `bulk.v1.cancel`.
    Cancel,
    /// `bulk.v1.job`.
    Job,
    /// `bulk.v1.count`.
    Count,
    /// `bulk.v1.restore`.
    Restore,
}

impl Command {
    /// Every command.
    pub const ALL: [Command; 6] = [
        Command::Export,
        Command::Delete,
        Command::Cancel,
        Command::Job,
        Command::Count,
        Command::Restore,
    ];

    /// The subject's last token.
    pub fn name(self) -> &'static str {
        match self {
            Command::Export => "export",
            Command::Delete => "delete",
            Command::Cancel => "cancel",
            Command::Job => "job",
            Command::Count => "count",
            Command::Restore => "restore",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The subjects under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

impl Default for Subjects {
    fn default() -> Self {
        Subjects::new("bulk")
    }
}

impl Subjects {
    /// Subjects under `prefix` (`bulk`).
    pub fn new(prefix: &str) -> Subjects {
        Subjects {
            prefix: prefix.to_string(),
        }
    }

    /// `<prefix>.v1.<command>`.
    pub fn command(&self, c: Command) -> String {
        format!("{}.v1.{}", self.prefix, c.name())
    }

    /// `<prefix>.v1.submit.<command>`: durable intake.
    pub fn submit(&self, c: Command) -> String {
        format!("{}.v1.submit.{}", self.prefix, c.name())
    }

    /// `<prefix>.v1.submit.>`: what the intake stream captures.
    pub fn submit_all(&self) -> String {
        format!("{}.v1.submit.>", self.prefix)
    }

    /// `<prefix>.v1.events`: the root of every event subject.
    pub fn events_root(&self) -> String {
        format!("{}.v1.events", self.prefix)
    }

    /// `<prefix>.v1.events.>`: what `BULK_EVENTS` captures.
    pub fn events_all(&self) -> String {
        format!("{}.v1.events.>", self.prefix)
    }

    /// `<prefix>.v1.events.<org>.job.<job>`; `job` may be `*` or `>`.
    pub fn job_events(&self, org: &str, job: &str) -> String {
        format!("{}.v1.events.{org}.job.{job}", self.prefix)
    }

    /// `<prefix>.v1.events.<org>.contact_removed` (or `.contact_restored`).
    pub fn contact_event(&self, org: &str, kind: ContactEventType) -> String {
        format!("{}.v1.events.{org}.{}", self.prefix, kind.as_str())
    }

    /// `<prefix>.v1.internal.cancel`: the cancel broadcast to every instance.
    pub fn internal_cancel(&self) -> String {
        format!("{}.v1.internal.cancel", self.prefix)
    }

    /// What an event subject names, relative to this prefix.
    pub fn parse_event<'a>(&self, subject: &'a str) -> Option<EventSubject<'a>> {
        let root = self.events_root();
        let rest = subject.strip_prefix(root.as_str())?.strip_prefix('.')?;
        let (org, tail) = rest.split_once('.')?;
        match tail.split_once('.') {
            Some(("job", job)) if !job.is_empty() && !job.contains('.') => {
                Some(EventSubject::Job { org, job })
            }
            None => ContactEventType::parse(tail).map(|kind| EventSubject::Contact { org, kind }),
            _ => None,
        }
    }
}

/// An event subject taken apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventSubject<'a> {
    /// `…events.<org>.job.<job>`.
    Job {
        /// Organisation id (as written).
        org: &'a str,
        /// Job id.
        job: &'a str,
    },
    /// `…events.<org>.contact_removed` or `….contact_restored`.
    Contact {
        /// Organisation id (as written).
        org: &'a str,
        /// Removed or restored.
        kind: ContactEventType,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_formatted_and_parsed_back() {
        let s = Subjects::default();
        assert_eq!(s.command(Command::Export), "bulk.v1.export");
        assert_eq!(s.submit(Command::Delete), "bulk.v1.submit.delete");
        assert_eq!(s.job_events("o", "j"), "bulk.v1.events.o.job.j");
        assert_eq!(
            s.parse_event("bulk.v1.events.o.job.j"),
            Some(EventSubject::Job { org: "o", job: "j" })
        );
        for kind in [ContactEventType::Removed, ContactEventType::Restored] {
            assert_eq!(
                s.parse_event(&s.contact_event("o", kind)),
                Some(EventSubject::Contact { org: "o", kind })
            );
        }
        assert_eq!(s.parse_event("bulk.v1.events.o.job.j.k"), None);
        assert_eq!(s.parse_event("other.v1.events.o.job.j"), None);
    }
}
