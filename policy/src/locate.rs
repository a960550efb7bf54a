//! Where each node of a YAML document is, by path (`rules[3].who[1]`, `groups.eng.include[0]`,
//! the same form serde_path_to_error reports), so errors found after parsing can still name the
//! line and column an admin has to edit.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// Line and column, both 1-based.
pub type Pos = (usize, usize);

#[derive(Debug, Default)]
pub struct Locations {
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    loc: Locations,
}

fn join(base: &str, key: &str) -> String {
    if base.is_empty() {
        key.to_string()
    } else {
        format!("{base}.{key}")
    }
}

impl Builder {
    /// The path of a node starting now, or None when the node is a mapping key.
    fn node_path(&mut self, ev: &Event, mark: Marker) -> Option<String> {
        let pos = (mark.line(), mark.col() + 1);
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                self.loc.values.insert(p.clone(), pos);
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => {
                    let p = join(path, &k);
                    self.loc.values.insert(p.clone(), pos);
                    Some(p)
                }
                None => {
                    let name = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => "?".into(),
                    };
                    self.loc.keys.insert(join(path, &name), pos);
                    *key = Some(name);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        match &ev {
            Event::Scalar(..) | Event::Alias(..) => {
                let _ = self.node_path(&ev, mark);
            }
            Event::MappingStart(..) => {
                let path = self.node_path(&ev, mark).unwrap_or_default();
                self.stack.push(Frame::Map { path, key: None });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(&ev, mark).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

impl Locations {
    /// Indexes `text`; a document YAML cannot parse yields what was read before the error.
    pub fn parse(text: &str) -> Locations {
        let mut b = Builder::default();
        let mut parser = Parser::new_from_str(text);
        let _ = parser.load(&mut b, false);
        b.loc
    }

    /// Where the value at `path` starts.
    pub fn value(&self, path: &str) -> Option<Pos> {
        self.values.get(path).copied()
    }

    /// Where the key of the mapping entry at `path` is.
    pub fn key(&self, path: &str) -> Option<Pos> {
        self.keys.get(path).copied()
    }

    /// The value at `path`, or the closest enclosing node that has a position.
    pub fn nearest(&self, path: &str) -> Pos {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.value(&p).or_else(|| self.key(&p)) {
                return pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p.truncate(i),
                None => return (1, 1),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_match_the_document() {
        let text = "version: 1\ngroups:\n  eng:\n    members: [alice, bob]\nrules:\n  - action: allow\n    who:\n      - group:eng\n      - user:carol\n";
        let l = Locations::parse(text);
        assert_eq!(l.value("version"), Some((1, 10)));
        assert_eq!(l.key("groups.eng"), Some((3, 3)));
        assert_eq!(l.value("groups.eng.members[1]"), Some((4, 22)));
        assert_eq!(l.value("rules[0].who[1]"), Some((9, 9)));
        assert_eq!(Some(l.nearest("rules[0].who[7]")), l.value("rules[0].who"));
        assert_eq!(l.nearest("nothing.here"), (1, 1));
    }
}
