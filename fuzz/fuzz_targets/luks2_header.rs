//! Both header copies from arbitrary bytes. Whatever parses must encode,
//! and the encoding must parse back to the same header (round trip).
#![no_main]

use coffre_luks2::header;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut read = |off: u64, len: usize| -> Result<Option<Vec<u8>>, ()> {
        let Ok(off) = usize::try_from(off) else {
            return Ok(None);
        };
        Ok(data.get(off..off.saturating_add(len)).map(<[u8]>::to_vec))
    };
    let Ok(Ok(loaded)) = header::load(&mut read) else {
        return;
    };
    let h = loaded.header;
    let [p, s] = h.encode().expect("a header we loaded must encode");
    let mut both = p.clone();
    both.extend_from_slice(&s);
    let mut read2 = |off: u64, len: usize| -> Result<Option<Vec<u8>>, ()> {
        let off = usize::try_from(off).unwrap();
        Ok(both.get(off..off.saturating_add(len)).map(<[u8]>::to_vec))
    };
    let again = header::load(&mut read2)
        .unwrap()
        .expect("our encoding must load");
    assert!(again.is_consistent());
    assert_eq!(again.header.metadata, h.metadata);
    assert_eq!(again.header.binary.seqid, h.binary.seqid);
    assert_eq!(again.header.binary.uuid, h.binary.uuid);
});
