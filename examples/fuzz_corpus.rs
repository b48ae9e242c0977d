//! Writes the fuzzers' seed corpora from real traffic:
//!
//! ```sh
//! cargo run --example fuzz_corpus -- fuzz/corpus
//! ```
//!
//! It runs a small scenario (KeyPackages, a group of three, commits,
//! messages, a removal) through the Delivery Service core with real openmls
//! clients and saves what crossed each parser: request and response frames,
//! push frames, MLS messages, KeyPackages, stored group state, plus
//! addresses, invite tokens, certificates and a configuration file. Each
//! seed is checked to decode before it is written.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::indexing_slicing)]

use std::path::{Path, PathBuf};

use hush::auth::{HushAddress, Identity, InviteToken};
use hush::client::mls::Member;
use hush::delivery::memory::MemoryStore;
use hush::delivery::{Caller, Delivery, Notification, Storage};
use hush::wire::{Push, Request, Response};

struct Corpus {
    root: PathBuf,
}

impl Corpus {
    fn put(&self, target: &str, bytes: &[u8]) {
        let dir = self.root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let name: String = digest.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| "fuzz/corpus".into());
    let c = Corpus { root: Path::new(&root).to_owned() };
    let mut store = MemoryStore::default();
    let removal_key = Identity::generate().unwrap().public_key();
    let mut ds = Delivery::new(86_400, removal_key);
    let mut now = 100;
    let mut members: Vec<Member> = (0..3)
        .map(|_| {
            let (_, _, m) = Member::generate().unwrap();
            store.enrol(m.certificate());
            m
        })
        .collect();
    for m in &members {
        c.put("device_certificate", &m.certificate().encode());
    }
    let mut exchange = |c: &Corpus, store: &mut MemoryStore, who: Caller, request: Request| -> Response {
        let frame = request.encode().unwrap();
        assert_eq!(Request::decode(&frame).unwrap(), request);
        c.put("wire_request", &frame);
        now += 1;
        let out = ds.handle(store, who, request, now);
        let resp = out.response.encode().unwrap();
        assert!(Response::decode(&resp).is_ok());
        c.put("wire_response", &resp);
        for n in &out.notifications {
            let push = match n {
                Notification::Message { group, seq, head, message, .. } => {
                    Push::Message { group: group.clone(), seq: *seq, head: *head, ciphertext: Some(message.clone()) }
                }
                Notification::Welcome { .. } => Push::Welcome,
                Notification::Revoked { .. } => continue,
            };
            c.put("wire_push", &push.encode_framed().unwrap());
        }
        out.response
    };

    for m in &members {
        let packages = m.key_packages(2).unwrap();
        for p in &packages {
            c.put("key_package", p);
        }
        exchange(
            &c,
            &mut store,
            Caller::of(m.certificate()),
            Request::PublishKeyPackages { packages, last_resort: Some(1) },
        );
    }
    let caller = |m: &Member| Caller::of(m.certificate());
    let alice = caller(&members[0]);
    let g = members[0].create_group(&removal_key).unwrap();
    // The group_info target takes a u16 length, the GroupInfo, the tree.
    let framed_info = |info: &[u8], tree: &[u8]| {
        let mut seed = u16::try_from(info.len()).unwrap().to_be_bytes().to_vec();
        seed.extend_from_slice(info);
        seed.extend_from_slice(tree);
        seed
    };
    c.put("group_info", &framed_info(&g.group_info, &g.ratchet_tree));
    exchange(&c, &mut store, alice, Request::CreateGroup { group_info: g.group_info, ratchet_tree: g.ratchet_tree });
    let mut kps = vec![];
    for t in [1, 2] {
        let account = members[t].account().0;
        match exchange(&c, &mut store, alice, Request::ClaimKeyPackage { account }) {
            Response::KeyPackages { packages } => kps.extend(packages.into_iter().map(|p| (members[t].account(), p))),
            other => panic!("{other:?}"),
        }
    }
    let commit = members[0].add(&g.id, &kps).unwrap();
    c.put("mls_frame", &commit.message);
    c.put("group_info", &framed_info(&commit.group_info, &[]));
    exchange(&c, &mut store, alice, commit.into_request());
    members[0].merge_pending(&g.id).unwrap();
    for t in [1, 2] {
        let who = caller(&members[t]);
        if let Response::Welcomes { welcomes } = exchange(&c, &mut store, who, Request::FetchWelcomes) {
            members[t].join(&welcomes[0].1).unwrap();
            exchange(&c, &mut store, who, Request::AckWelcome { id: welcomes[0].0 });
        }
    }
    for (i, text) in ["hello", "a longer message to vary the padding bucket"].iter().enumerate() {
        let m = members[i].encrypt(&g.id, text.as_bytes()).unwrap();
        c.put("mls_frame", &m);
        exchange(&c, &mut store, caller(&members[i]), Request::Send { message: m, welcome: None, group_info: None });
    }
    let bob = caller(&members[1]);
    exchange(&c, &mut store, bob, Request::Fetch { group: g.id.clone(), after: 0, limit: 10 });
    exchange(&c, &mut store, bob, Request::Ack { group: g.id.clone(), seq: 2 });
    exchange(&c, &mut store, bob, Request::ListGroups);
    exchange(&c, &mut store, bob, Request::CountKeyPackages);
    exchange(&c, &mut store, bob, Request::Ping { nonce: 7 });
    exchange(&c, &mut store, bob, Request::Fetch { group: vec![9; 16], after: 0, limit: 0 });
    exchange(&c, &mut store, bob, Request::FetchGroupInfo { group: g.id.clone() });
    let carol = members[2].account();
    let removal = members[0].remove(&g.id, &[carol]).unwrap();
    c.put("mls_frame", &removal.message);
    exchange(&c, &mut store, alice, removal.into_request());
    members[0].merge_pending(&g.id).unwrap();
    let proposal = members[1].leave(&g.id).unwrap();
    c.put("mls_frame", &proposal);
    exchange(&c, &mut store, bob, Request::Send { message: proposal, welcome: None, group_info: None });
    let state = store.group(&g.id).unwrap().unwrap().state;
    assert!(hush::mls::decode_state(&state).is_ok());
    c.put("group_state", &state);
    let register = Request::Register {
        invite: Some(InviteToken::generate().unwrap().to_string()),
        certificate: members[0].certificate().encode(),
    };
    for req in [register, Request::Status] {
        c.put("wire_request", &req.encode().unwrap());
    }
    c.put("wire_push", &Push::Resync.encode_framed().unwrap());

    let id = Identity::generate().unwrap();
    let address = HushAddress { host: "chat.example.org".into(), port: 7443, fingerprint: id.fingerprint() };
    c.put("address", address.to_string().as_bytes());
    c.put("address", HushAddress { host: "::1".into(), ..address.clone() }.to_string().as_bytes());
    c.put("address", id.account_id().to_string().as_bytes());
    c.put("invite_token", InviteToken::generate().unwrap().to_string().as_bytes());
    let cert = id.tls_credentials().unwrap();
    c.put("certificate", cert.cert[0].as_ref());
    let ecdsa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = rcgen::CertificateParams::new(vec!["x".into()]).unwrap().self_signed(&ecdsa).unwrap();
    c.put("certificate", other.der().as_ref());
    c.put(
        "config",
        b"listen = \"[::]:7443\"\npublic_host = \"chat.example.org\"\nmax_connections = 100\nretention_days = 7\nopen_registration = false\n",
    );
    c.put("delivery_state", &[0, 1, 2, 0, 3, 1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    println!("wrote seed corpora under {root}");
}
