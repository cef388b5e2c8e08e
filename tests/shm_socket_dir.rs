//! The shared `/tmp` fallback for endpoint sockets is used only when it is this user's own.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::PathBuf;

use rsmsg::transport::shm::ensure_private_dir;

fn scratch(tag: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("rsmsg-dir-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

fn mode(p: &PathBuf) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

#[test]
fn a_missing_directory_is_created_private() {
    let d = scratch("new");
    ensure_private_dir(&d).unwrap();
    assert_eq!(mode(&d), 0o700);
    std::fs::remove_dir(&d).unwrap();
}

#[test]
fn an_own_directory_with_a_loose_mode_is_tightened() {
    let d = scratch("loose");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    ensure_private_dir(&d).unwrap();
    assert_eq!(mode(&d), 0o700);
    std::fs::remove_dir(&d).unwrap();
}

#[test]
fn a_link_or_a_file_in_its_place_is_refused() {
    let target = scratch("target");
    std::fs::create_dir(&target).unwrap();
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755)).unwrap();
    let link = scratch("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = ensure_private_dir(&link).unwrap_err().to_string();
    assert!(e.contains("symbolic link"), "{e}");
    // The link's target was not touched.
    assert_eq!(mode(&target), 0o755);
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_dir(&target).unwrap();

    let file = scratch("file");
    std::fs::write(&file, b"").unwrap();
    let e = ensure_private_dir(&file).unwrap_err().to_string();
    assert!(e.contains("file"), "{e}");
    std::fs::remove_file(&file).unwrap();
}

#[test]
fn another_users_directory_is_refused_and_left_alone() {
    let me = std::fs::metadata("/proc/self").unwrap().uid();
    let (d, owner) = if me == 0 {
        // As root: a directory handed to another user, as an attacker would leave it.
        let d = scratch("theirs");
        std::fs::create_dir(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(65534), Some(65534)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
        (d, 65534)
    } else {
        // Otherwise the root directory is someone else's (root's) already.
        (PathBuf::from("/"), 0)
    };
    let before = mode(&d);
    let e = ensure_private_dir(&d).unwrap_err().to_string();
    assert!(e.contains(&format!("owner uid {owner}")), "{e}");
    assert_eq!(
        mode(&d),
        before,
        "the mode of a foreign directory was changed"
    );
    if me == 0 {
        std::fs::remove_dir(&d).unwrap();
    }
}
