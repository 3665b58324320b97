//! The builder's half of the sync: one POSIX sh program and the line
//! protocol absconda speaks with it over one SSH channel.
//!
//! The builder may have only sh, coreutils, tar and flock (GNU or busybox),
//! so the program uses nothing else: `find -exec stat -c` for the listing
//! (written to a file beside the copy, so one walk gives both hashes),
//! `xargs -0` for lists of names, `tr` to turn the lines absconda sends
//! into NUL-separated lists, `sha256sum` and `readlink` for `--verify`.
//!
//! The exchange, on one channel:
//! 1. the script takes the copy's own lock (a sync cut off by a dropped
//!    connection may still be finishing when the next build holds the
//!    lease), reads the state file and, for a copy marked clean, lists the
//!    copy; it prints `state <none|dirty|clean> <manifest> <recorded
//!    fingerprint> <current fingerprint> <same|changed boot>`, where the
//!    fingerprint is the hash of the listing plus every file's mtime to
//!    the nanosecond (stat's `%y`), so that an edit of the copy on the
//!    builder shows even within the second of the file's own mtime;
//! 2. absconda decides between a delta and a full send and writes five
//!    lines (the command; deletions; permission changes; and for
//!    `--verify` the files and symlinks to hash), then the tar stream;
//! 3. the script marks the copy dirty, applies the change, lists the copy
//!    again and, only when that listing (and with `--verify` every file's
//!    SHA-256) matches what absconda predicted, marks it clean with the new
//!    manifest hash. It prints `applied <listing>`, `verified <files>
//!    <links>` and `result <clean|mismatch …|stale|failed …>`.
//!
//! So a copy is never marked clean unless it was checked, and any
//! interruption leaves it dirty, which the next build sees.
//!
//! With the content store ([`super::store`]), the tar stream's files are hard
//! links to `.absconda-store-<manifest>/…`, a symlink to the store the
//! script puts beside the unpacked entries for the time of the unpacking,
//! or to `.absconda-in-<manifest>/…`, the content sent with them, which the
//! script hashes and renames into the store (a mismatch is removed and
//! reported as `mismatch content`) before the listing is checked.
//!
//! The apply step trusts neither the request nor the old copy: a delta is
//! unpacked into a staging folder and moved into the copy entry by entry,
//! deletions and `chmod`s are applied only where every folder above the
//! name is a real folder of the copy, and names with `..` or a leading `/`
//! are refused, so nothing outside the copy's tree is ever touched.

use crate::shell;

/// Prints the SHA-256 of the sorted listing of `$tree` (see
/// [`super::manifest::Manifest::listing_lines`] for the prediction).
macro_rules! listing_fn {
    () => {
        r#"
listing_text() {
  ( cd "$tree" || exit 1
    find . ! -name . -type d -exec stat -c 'd %a %n' {} + &&
    find . -type f -exec stat -c 'f %a %s %Y %n' {} + &&
    find . -type l -exec stat -c 'l %s %n' {} +
  ) | sort
}
sha() {
  sha256sum | { read -r h _; echo "$h"; }
}
# Files' mtimes to the nanosecond: GNU and busybox stat both print them
# with `%y` (tar restores only whole seconds on some builders, so the
# prediction leaves them out; a change on the builder still shows here).
stamp_text() {
  ( cd "$tree" || exit 1
    find . -type f -exec stat -c '%y %n' {} +
  ) | sort
}
# Sets lsec, the hash of the listing absconda predicts, and lall, the hash
# of that listing with the stamps: whether anyone touched the copy since.
listings() {
  lsec=- lall=-
  listing_text > "$dir/listing.tmp" || return 1
  lsec=$(sha < "$dir/listing.tmp")
  lall=$( { cat "$dir/listing.tmp"; echo /; stamp_text; } | sha)
  rm -f "$dir/listing.tmp"
}
"#
    };
}

/// The header shared by the scripts: where the copy is, and the listing.
macro_rules! prelude {
    () => {
        concat!(
            r#"
ws=$1 key=$2 run=$3 seek=${4:--}
export LC_ALL=C TZ=UTC0
set -f
case $ws in /*) ;; *) ws=$PWD/$ws ;; esac
case $run in ''|/*) ;; *) run=$PWD/$run ;; esac
dir=$ws/contexts/$key
tree=$dir/tree
"#,
            listing_fn!()
        )
    };
}

const SYNC: &str = concat!(
    prelude!(),
    r#"
for d in "$ws/contexts" "$dir"; do
  if [ -L "$d" ]; then
    echo "error $d is a symlink: copies are kept only in a real folder" >&2
    exit 70
  fi
done
if ! mkdir -p "$dir" 2>/dev/null; then
  echo "error cannot create $dir as $(id -un)" >&2
  exit 70
fi
# The copy is this user's alone: no other local user (a group-readable
# workspace included) can read it or run a setuid file from it.
if ! chmod 700 "$dir"; then
  echo "error cannot restrict $dir to $(id -un)" >&2
  exit 70
fi
# Nothing here follows a symlink planted in the copy's folder.
for f in lock state.tmp; do
  if [ -L "$dir/$f" ]; then rm -f "$dir/$f"; fi
done
exec 8>>"$dir/lock" || exit 70
if ! flock -w 120 8; then
  echo "error $dir stayed locked by an earlier sync for 120s" >&2
  exit 71
fi
boot=$(cat /proc/sys/kernel/random/boot_id 2>/dev/null)
[ -n "$boot" ] || boot=unknown

# The state of the copy in $dir: none, dirty, or clean with its manifest,
# its recorded fingerprint and the current one.
copy_state() {
  state=none mh=- lh=- cur=- bootst=- lsec=-
  if [ -L "$tree" ]; then
    state=dirty
  elif [ -d "$tree" ]; then
    state=dirty
    if [ -f "$dir/state" ] && read -r v st smh slh sboot < "$dir/state" &&
       [ "$v" = v1 ] && [ "$st" = clean ]; then
      state=clean mh=$smh lh=$slh
      listings
      cur=$lall
      if [ "$sboot" = "$boot" ]; then bootst=same; else bootst=changed; fi
    fi
  fi
}
copy_state
# A context this copy never held (a CI runner's fresh checkout) whose
# manifest another copy of this workspace holds, untouched since it was
# marked clean: the build uses that copy (whose path BuildKit already
# knows), locked like its own, and changes nothing in it.
aliased=
case $seek in
  *[!0-9a-f]*|'') seek=- ;;
esac
if [ "$state" = none ] && [ "$seek" != - ]; then
  # (A list in a file, read by this shell: a name may hold spaces.)
  list=$dir/alias.list
  find "$ws/contexts" -mindepth 2 -maxdepth 2 -name state -type f \
    -exec grep -l "^v1 clean $seek " {} + > "$list" 2>/dev/null
  while IFS= read -r a; do
    a=${a%/state}
    case $a in "$ws/contexts/"*/*|"$dir") continue ;; "$ws/contexts/"*) ;; *) continue ;; esac
    [ -d "$a" ] && [ ! -L "$a" ] && [ -f "$a/lock" ] && [ ! -L "$a/lock" ] || continue
    exec 9>>"$a/lock" || continue
    flock -n 9 || { exec 9>&-; continue; }
    odir=$dir
    dir=$a tree=$a/tree
    copy_state
    if [ "$state" = clean ] && [ "$mh" = "$seek" ] && [ "$cur" = "$lh" ]; then
      exec 8>&9 9>&-
      aliased=1
      # This key's own folder holds nothing yet: it goes.
      rm -f "$odir/lock" "$list" && rmdir "$odir" 2>/dev/null
      break
    fi
    exec 9>&-
    dir=$odir tree=$odir/tree
    copy_state
  done < "$list"
  rm -f "$list"
fi
printf 'state %s %s %s %s %s\n' "$state" "$mh" "$lh" "$cur" "$bootst"

IFS= read -r cmd || exit 0
set -- $cmd
if [ "$1" != v1 ]; then
  echo "error unknown sync request: $1" >&2
  exit 2
fi
mode=$2 base=$3 new=$4 tarmode=$5 expect=$6 verify=$7 vfiles=$8 vlinks=$9 stream=${10:--}
case $stream in
  -) ;;
  *[!0-9]*|'') echo "error refused the stream length $stream" >&2; exit 2 ;;
  *) if [ "$mode" != full ] || [ "$tarmode" = none ]; then
       echo "error a streamed send is a full send with content" >&2
       exit 2
     fi ;;
esac
if ! { IFS= read -r dels && IFS= read -r mods && IFS= read -r vlist &&
       IFS= read -r vodd && IFS= read -r vlnk; }; then
  echo "error the sync request was cut short" >&2
  exit 2
fi
if { [ -n "$aliased" ] && [ "$mode" != delta ]; } || { [ "$mode" = delta ] &&
   ! { [ "$state" = clean ] && [ "$mh" = "$base" ] && [ "$cur" = "$lh" ]; }; }; then
  echo "result stale"
  exit 4
fi

putstate() {
  rm -f "$dir/state.tmp" &&
    printf '%s\n' "$1" > "$dir/state.tmp" && mv -f "$dir/state.tmp" "$dir/state"
}
fail() {
  echo "result failed $1"
  echo "error $1" >&2
  exit 1
}
lib=$(cat <<'EOF'
# A name absconda may send: relative, without `.`, `..` or empty parts.
named() {
  case /$1/ in
    //|*/../*|*/./*|*//*) echo "error refused the name $1" >&2; return 1 ;;
  esac
}
# True when every folder above $1 in the current folder is a real folder.
inside() {
  q=$1
  while :; do
    case $q in */*) q=${q%/*} ;; *) return 0 ;; esac
    [ -d "$q" ] && [ ! -L "$q" ] || return 1
  done
}
# rm -rf, also of read-only folders (they stop it for a user other than root).
wipe() {
  if [ -L "$1" ]; then rm -f -- "$1"; return; fi
  [ -e "$1" ] || return 0
  rm -rf -- "$1" 2>/dev/null && return 0
  # Folders only: a file may be a link into the store, shared by other copies.
  find "$1" -type d ! -perm -700 -exec chmod u+rwx {} + 2>/dev/null
  rm -rf -- "$1"
}
EOF
)
eval "$lib"
decode() {
  printf '%s' "$1" | tr '\376\377' '\n\000'
}
# A build waiting on the run folder's fifo for a streamed send is let go
# at exit, whatever happened (see the unpacking below).
if [ "$stream" != - ] && [ -n "$run" ]; then
  trap 'if [ -p "$run/context.tar" ]; then : 9<>"$run/context.tar"; fi' EXIT
fi
putstate 'v1 dirty' || fail "cannot write $dir/state"
storelink=.absconda-store-$new incoming=.absconda-in-$new badblobs=0
# Content sent for the store lands in $incoming: each file is hashed and
# renamed into the store only when the hash matches its name; one that
# does not is removed (the copy then fails its check and is sent again).
ingest() {
  [ -d "$into/$incoming" ] && [ ! -L "$into/$incoming" ] || return 0
  mkdir -p "$ws/store/b" || fail "cannot create $ws/store/b"
  (cd "$into/$incoming" && find . -type f -exec sha256sum {} +) |
    while read -r h n; do
      n=${n#./}
      case $n in
        */*) ;;
        "$h"-*) printf '%s\n' "$n" ;;
        *) rm -f -- "$into/$incoming/$n"; echo "bad $n" >&2 ;;
      esac
    done > "$dir/ingest" 2> "$dir/ingest.bad"
  badblobs=$(wc -l < "$dir/ingest.bad")
  (cd "$into/$incoming" && xargs -r sh -c 'exec mv -f -- "$@" "$0"' "$ws/store/b" < "$dir/ingest") ||
    fail "cannot move the received content into $ws/store/b"
  rm -f "$dir/ingest" "$dir/ingest.bad"
  wipe "$into/$incoming" || fail "cannot remove $into/$incoming"
}

# Nothing the request, the tar stream or the old copy holds may write,
# change or delete anything outside $tree: a name is refused unless it is
# relative without `.` or `..`, and skipped unless every folder above it in
# the copy is a real folder (a symlink there would lead outside). A delta is
# unpacked into a fresh staging folder first and moved in entry by entry;
# a full send unpacks into a fresh, empty copy. (tar itself refuses `..`
# and defers symlinks that lead out of the folder it unpacks into.)
stage=$dir/stage
wipe "$stage" || fail "cannot remove $stage"
if [ "$mode" = full ] && { [ -e "$tree" ] || [ -L "$tree" ]; }; then
  wipe "$tree" || fail "cannot remove the old copy $tree"
fi
[ -d "$tree" ] || mkdir "$tree" || fail "cannot create $tree"
cd "$tree" || fail "cannot enter $tree"
if [ -n "$dels" ]; then
  decode "$dels" | xargs -0 -r sh -c "$lib"'
    for p; do
      named "$p" || exit 1
      if inside "$p"; then wipe "$p" || exit 1; fi
    done' absconda-delete || fail "cannot delete old entries in $tree"
fi
into=$tree
[ "$mode" = delta ] && into=$stage
p=
case $tarmode in
  plain|gzip|zstd)
    case $(tar --version 2>/dev/null) in *'GNU tar'*|*bsdtar*) p=-p ;; esac
    z=
    [ "$tarmode" = gzip ] && z=-z
    { [ "$into" = "$tree" ] || mkdir "$stage"; } || fail "cannot create $stage"
    # A streamed cold send: two archives, the context as it is and then the
    # links that put its content into the store. The first, cut off at its
    # announced length, goes both into the copy and to the `docker build`
    # waiting on the run folder's fifo (see remote.rs, AFTER_SYNC), which
    # so reads the context while it arrives. The run's context link is made
    # first: the build finds the copy's lock through it, and waits there for
    # this script's verdict.
    fifo=
    if [ "$stream" != - ] && [ -n "$run" ]; then
      rm -f "$run/streamed"
      if [ -L "$run/context" ]; then rm -f "$run/context"; fi
      ln -s "$tree" "$run/context" || fail "cannot link the copy into $run"
      n=0
      while [ ! -p "$run/context.tar" ] && [ "$n" -lt 1500 ]; do
        n=$((n + 1))
        sleep 0.02
      done
      [ -p "$run/context.tar" ] && fifo=$run/context.tar
    fi
    # GNU tee stops at a reader that went away unless told not to; busybox
    # tee goes on by itself.
    tp=
    case $(tee --version 2>/dev/null) in *GNU*) tp=-p ;; esac
    untar() { (cd "$into" && umask 0 && exec tar -x $p -o -f -); }
    fork() { if [ -n "$fifo" ]; then tee $tp "$fifo"; else cat; fi; }
    # Exactly the first archive's bytes (busybox head reads ahead; dd with
    # fullblock, GNU or busybox, reads what it is asked for).
    first() {
      big=$((stream / 1048576)) rest=$((stream % 1048576))
      { [ "$big" = 0 ] || dd bs=1048576 count="$big" iflag=fullblock 2>/dev/null; } &&
        { [ "$rest" = 0 ] || dd bs="$rest" count=1 iflag=fullblock 2>/dev/null; }
    }
    both() { { first | fork | untar; } && untar; }
    # Files the store holds arrive as hard links through this symlink.
    if [ -d "$ws/store/b" ] && [ ! -L "$ws/store" ] && [ ! -L "$ws/store/b" ]; then
      ln -s "$ws/store/b" "$into/$storelink" || fail "cannot link the store into $into"
    fi
    if [ "$stream" != - ]; then
      rm -f "$dir/zstd.failed"
      case $tarmode in
        zstd) { zstd -dcq || : > "$dir/zstd.failed"; } | both ;;
        gzip) gzip -dc | both ;;
        *) both ;;
      esac
      untarred=$?
      if [ -e "$dir/zstd.failed" ]; then
        rm -f "$dir/zstd.failed" "$into/$storelink"
        fail "zstd could not decode the changes"
      fi
    elif [ "$tarmode" = zstd ]; then
      # A pipe's status is tar's: a failed zstd leaves a mark.
      rm -f "$dir/zstd.failed"
      (cd "$into" && umask 0 && { zstd -dcq || : > "$dir/zstd.failed"; } | tar -x $p -o -f -)
      untarred=$?
      if [ -e "$dir/zstd.failed" ]; then
        rm -f "$dir/zstd.failed" "$into/$storelink"
        fail "zstd could not decode the changes"
      fi
    else
      (cd "$into" && umask 0 && exec tar -x $p -o $z -f -)
      untarred=$?
    fi
    rm -f "$into/$storelink"
    [ "$untarred" = 0 ] || fail "tar could not unpack the changes into $into"
    ingest ;;
  none) ;;
  *) fail "unknown archive mode $tarmode" ;;
esac
if [ "$into" = "$stage" ] && [ "$tarmode" != none ]; then
  # find lists a folder before its entries: when one is moved, every
  # folder above it in the copy is already known to be a real folder.
  (cd "$stage" && find . -mindepth 1 -print0) | xargs -0 -r sh -c "$lib"'
    s=$1; shift
    for p; do
      p=${p#./}
      [ -e "$s/$p" ] || [ -L "$s/$p" ] || continue   # moved with its folder
      named "$p" && inside "$p" || exit 1
      if [ -d "$s/$p" ] && [ ! -L "$s/$p" ] && [ -d "$p" ] && [ ! -L "$p" ]; then
        [ -w "$s/$p" ] || chmod u+w "$s/$p" || exit 1
        continue   # a folder in both: its entries move one by one
      fi
      if [ -e "$p" ] || [ -L "$p" ]; then wipe "$p" || exit 1; fi
      mv -f -- "$s/$p" "$p" || exit 1
    done' absconda-move "$stage" || fail "cannot move the changes into $tree"
  wipe "$stage" || fail "cannot remove $stage"
fi
if [ -n "$mods" ]; then
  decode "$mods" | xargs -0 -r -n 2 sh -c "$lib"'
    named "$2" || exit 1
    if inside "$2" && [ ! -L "$2" ]; then chmod -- "$1" "$2"; fi
  ' absconda-chmod || fail "cannot change permissions in $tree"
fi
# No setuid or setgid bit survives into the copy (absconda's listing leaves
# them out too); find never follows a symlink, and chmod skips them.
if [ "$tarmode" != none ] || [ -n "$mods" ]; then
  find "$tree" ! -type l \( -perm -4000 -o -perm -2000 \) -exec chmod ug-s {} + ||
    fail "cannot clear setuid and setgid bits in $tree"
fi

if [ "$mode" = delta ] && [ -z "$dels$mods" ] && [ "$tarmode" = none ]; then
  got=$lsec all=$cur   # nothing changed since it was listed
else
  listings
  got=$lsec all=$lall
fi
echo "applied $got"
ok=yes
[ "$got" = "$expect" ] || ok=listing
if [ "$badblobs" != 0 ]; then
  if [ "$ok" = yes ]; then ok=content; else ok="$ok content"; fi
fi
if [ "$verify" = 1 ]; then
  f=$( { decode "$vlist" | xargs -0 -r sha256sum -- | cut -c1-64
         decode "$vodd" | xargs -0 -r -n 1 sh -c 'sha256sum < "$1" | cut -c1-64' absconda-hash
       } | sha256sum)
  f=${f%% *}
  l=$(decode "$vlnk" | xargs -0 -r -n 1 readlink -- | sha256sum)
  l=${l%% *}
  echo "verified $f $l"
  [ "$f" = "$vfiles" ] || ok="$ok files"
  [ "$l" = "$vlinks" ] || ok="$ok symlinks"
  ok=${ok#yes }
fi
if [ -n "$run" ]; then
  # A second attempt in the same run replaces the link (ln -s onto a link
  # to a folder would create the new link inside the copy).
  if [ -L "$run/context" ]; then rm -f "$run/context"; fi
  ln -s "$tree" "$run/context" || fail "cannot link the copy into $run"
fi
printf 'tree %s\n' "$tree"
if [ "$ok" != yes ]; then
  echo "result mismatch $ok"
  exit 3
fi
putstate "v1 clean $new $all $boot" || fail "cannot write $dir/state"
if [ "$stream" != - ] && [ -n "$run" ]; then
  printf 'clean %s\n' "$new" > "$run/streamed.tmp" && mv -f "$run/streamed.tmp" "$run/streamed"
fi
echo "result clean"

# Copies nobody has built from for the store's TTL (in minutes; 30 days
# unless the store says otherwise) go, unless a run folder links to them.
ttl=$(cat "$ws/store/ttl" 2>/dev/null)
case $ttl in ''|*[!0-9]*) ttl=43200 ;; esac
cd "$ws/contexts" &&
find . -mindepth 1 -maxdepth 1 -type d -mmin +"$ttl" ! -name "$key" 2>/dev/null |
  while IFS= read -r old; do
    old=${old#./}
    if find "$ws/runs" -mindepth 2 -maxdepth 2 -name context -type l -exec readlink {} \; 2>/dev/null |
       grep -qx -- "$ws/contexts/$old/tree"; then
      continue
    fi
    wipe "$old"
  done
exit 0
"#
);

/// Runs a command (the sync) once the run folder exists: sent together
/// with the lease request, it waits for the lease script, which makes the
/// folder only once it holds the lease, so the sync costs no round trip of
/// its own. It says `waiting` every second: when absconda has gone, that
/// write fails and ends it.
const AFTER_LEASE: &str = r#"
run=$1 wait=$2 cmd=$3
case $run in ''|/*) ;; *) run=$PWD/$run ;; esac
n=0
while [ ! -d "$run" ]; do
  n=$((n + 1))
  if [ "$n" -gt $((wait * 50)) ]; then
    echo "error the lease was not taken within ${wait}s" >&2
    exit 75
  fi
  sleep 0.02
  if [ $((n % 50)) -eq 0 ]; then echo waiting || exit 1; fi
done
eval "$cmd"
"#;

/// `command`, started once `run_dir` exists (see [`AFTER_LEASE`]), giving
/// up after `wait_secs`.
pub fn after_lease(run_dir: &str, wait_secs: u64, command: &str) -> String {
    shell::join([
        "sh",
        "-c",
        AFTER_LEASE,
        "absconda-after-lease",
        run_dir,
        &wait_secs.to_string(),
        command,
    ])
}

/// Prints the copy's sorted listing, for explaining a mismatch.
const LISTING: &str = concat!(prelude!(), "\nlisting_text\n");
const FINGERPRINT: &str = concat!(prelude!(), "\n{ listing_text; echo /; stamp_text; }\n");

/// The sync program for the copy `key` under `workspace`, linking the
/// copy into `run_dir` as `context` (no link when `run_dir` is empty).
/// With `seek` (the manifest about to be sent), a copy this key never
/// held is replaced by another copy of the workspace that holds exactly
/// that manifest, if there is one (see the script).
pub fn command(workspace: &str, key: &str, run_dir: &str, seek: Option<&str>) -> String {
    shell::join([
        "sh",
        "-c",
        SYNC,
        "absconda-sync",
        workspace,
        key,
        run_dir,
        seek.unwrap_or("-"),
    ])
}

/// Prints the copy's listing as the sync script computes its hash.
pub fn listing_command(workspace: &str, key: &str) -> String {
    shell::join(["sh", "-c", LISTING, "absconda-listing", workspace, key, ""])
}

/// Prints what the sync script hashes into the copy's recorded fingerprint
/// (the listing, then every file's mtime to the nanosecond).
pub fn fingerprint_command(workspace: &str, key: &str) -> String {
    shell::join([
        "sh",
        "-c",
        FINGERPRINT,
        "absconda-fingerprint",
        workspace,
        key,
        "",
    ])
}

/// What the builder said about its copy before the sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CopyState {
    /// No copy yet.
    None,
    /// A sync started and did not finish, or the state file is unreadable.
    Dirty,
    Clean {
        manifest: String,
        recorded_listing: String,
        current_listing: String,
        /// The builder booted since the copy was marked clean: files written
        /// just before a crash may have lost their content.
        rebooted: bool,
    },
}

impl CopyState {
    /// Parses `state …`; `None` for anything else.
    pub fn parse(line: &str) -> Option<CopyState> {
        let mut words = line.split(' ');
        if words.next()? != "state" {
            return None;
        }
        let state = words.next()?;
        let manifest = words.next()?;
        let recorded = words.next()?;
        let current = words.next()?;
        let boot = words.next()?;
        Some(match state {
            "none" => CopyState::None,
            "dirty" => CopyState::Dirty,
            "clean" => CopyState::Clean {
                manifest: manifest.to_string(),
                recorded_listing: recorded.to_string(),
                current_listing: current.to_string(),
                rebooted: boot != "same",
            },
            _ => return None,
        })
    }
}

/// How the changes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TarMode {
    /// Nothing to extract.
    None,
    Plain,
    Gzip,
    /// Decoded with the builder's `zstd` (absconda sends it only to a
    /// builder whose probe found one).
    Zstd,
}

impl TarMode {
    fn word(self) -> &'static str {
        match self {
            TarMode::None => "none",
            TarMode::Plain => "plain",
            TarMode::Gzip => "gzip",
            TarMode::Zstd => "zstd",
        }
    }
}

/// The lines absconda writes after the state line, before the tar stream.
pub struct Request<'a> {
    /// `None` for a full send into a fresh copy, else the base manifest hash.
    pub base: Option<&'a str>,
    pub new_manifest: &'a str,
    pub tar: TarMode,
    pub expected_listing: &'a str,
    pub delete: &'a [String],
    pub chmod: &'a [(u32, String)],
    pub verify: Option<&'a super::manifest::VerifyPlan>,
    /// A streamed cold send (see [`crate::context::write_two_archives`]):
    /// the length of the first archive before compression.
    pub stream: Option<u64>,
}

impl Request<'_> {
    pub fn encode(&self) -> Vec<u8> {
        use super::manifest::encode_line;
        let (vfiles, vlinks) = match self.verify {
            Some(v) => (v.files_hash.as_str(), v.links_hash.as_str()),
            None => ("-", "-"),
        };
        let mut out = format!(
            "v1 {} {} {} {} {} {} {} {} {}\n",
            if self.base.is_some() { "delta" } else { "full" },
            self.base.unwrap_or("-"),
            self.new_manifest,
            self.tar.word(),
            self.expected_listing,
            u8::from(self.verify.is_some()),
            vfiles,
            vlinks,
            self.stream
                .map_or_else(|| "-".to_string(), |n| n.to_string())
        )
        .into_bytes();
        out.extend(encode_line(self.delete.iter().map(String::as_str)));
        let modes: Vec<String> = self
            .chmod
            .iter()
            .flat_map(|(mode, path)| {
                let mode = mode & super::manifest::COPIED_MODE_BITS;
                [format!("0{mode:04o}"), path.clone()]
            })
            .collect();
        out.extend(encode_line(modes.iter().map(String::as_str)));
        let empty = Vec::new();
        let (files, odd, links) = match self.verify {
            Some(v) => (&v.files, &v.odd_files, &v.links),
            None => (&empty, &empty, &empty),
        };
        out.extend(encode_line(files.iter().map(String::as_str)));
        out.extend(encode_line(odd.iter().map(String::as_str)));
        out.extend(encode_line(links.iter().map(String::as_str)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts must parse in dash and busybox sh, the shells of stock builders.
    #[test]
    fn scripts_parse_in_posix_shells() {
        for script in [SYNC, LISTING, FINGERPRINT, AFTER_LEASE] {
            crate::test_support::assert_parses(script);
        }
    }

    #[test]
    fn state_lines() {
        assert_eq!(
            CopyState::parse("state none - - - -"),
            Some(CopyState::None)
        );
        assert_eq!(
            CopyState::parse("state dirty - - - -"),
            Some(CopyState::Dirty)
        );
        assert_eq!(
            CopyState::parse("state clean m l c same"),
            Some(CopyState::Clean {
                manifest: "m".into(),
                recorded_listing: "l".into(),
                current_listing: "c".into(),
                rebooted: false
            })
        );
        assert!(matches!(
            CopyState::parse("state clean m l c changed"),
            Some(CopyState::Clean { rebooted: true, .. })
        ));
        assert_eq!(CopyState::parse("error oops"), None);
        assert_eq!(CopyState::parse("state clean m"), None);
    }

    use crate::context::{Compression, DockerIgnore, walk};
    use crate::sync::cache::scan;
    use crate::sync::manifest::Manifest;
    use crate::sync::plan::Plan;
    use std::io::{BufRead, BufReader, Write};
    use std::path::Path;
    use std::process::{Command, Stdio};

    /// A shell and the PATH it finds its tools on.
    struct Shell {
        argv: Vec<String>,
        path: String,
    }

    fn gnu() -> Shell {
        Shell {
            argv: vec!["dash".into()],
            path: "/usr/bin:/bin".into(),
        }
    }

    /// busybox sh with busybox's own applets first on PATH.
    fn busybox(dir: &Path) -> Option<Shell> {
        crate::test_support::busybox_shell(dir).map(|(argv, path)| Shell { argv, path })
    }

    /// One sync through the script, locally: returns the state line and
    /// the script's other output lines.
    fn run_sync(
        sh: &Shell,
        ws: &Path,
        ctx: &Path,
        base: Option<&Manifest>,
        verify: bool,
        compression: Compression,
    ) -> (String, Vec<String>, Manifest) {
        run_sync_in(sh, None, ws, "", ctx, base, verify, compression)
    }

    /// [`run_sync`] started in `cwd`, linking the copy into `run`.
    #[allow(clippy::too_many_arguments)]
    fn run_sync_in(
        sh: &Shell,
        cwd: Option<&Path>,
        ws: &Path,
        run: &str,
        ctx: &Path,
        base: Option<&Manifest>,
        verify: bool,
        compression: Compression,
    ) -> (String, Vec<String>, Manifest) {
        let entries = walk(ctx, &DockerIgnore::parse(""), &[]).unwrap();
        let scanned = scan(entries, Vec::new(), &[]).unwrap();
        let new = scanned.manifest.clone();
        let plan = match base {
            Some(b) => Plan::delta(b, &new),
            None => Plan::full(&new),
        };
        let base_hash = base.map(Manifest::hash);
        let verify_plan = verify.then(|| new.verify_plan());
        let tar_mode = match (plan.send.is_empty(), compression) {
            (true, _) => TarMode::None,
            (false, Compression::None) => TarMode::Plain,
            (false, Compression::Gzip) => TarMode::Gzip,
            (false, Compression::Zstd) => TarMode::Zstd,
        };
        let new_hash = new.hash();
        let listing = new.listing_hash();
        let mut input = Request {
            base: base_hash.as_deref(),
            new_manifest: &new_hash,
            tar: tar_mode,
            expected_listing: &listing,
            delete: &plan.delete,
            chmod: &plan.chmod,
            verify: verify_plan.as_ref(),
            stream: None,
        }
        .encode();
        if tar_mode != TarMode::None {
            let (entries, extra) = scanned.tar_inputs(&plan.send);
            crate::sync::stream::write(&entries, &extra, compression, &mut input).unwrap();
        }
        let mut child = Command::new(&sh.argv[0])
            .args(&sh.argv[1..])
            .args(["-c", SYNC, "absconda-sync"])
            .arg(ws)
            .args(["k", run])
            .current_dir(cwd.unwrap_or(Path::new("/")))
            .env_clear()
            .env("PATH", &sh.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut state = String::new();
        out.read_line(&mut state).unwrap();
        child.stdin.take().unwrap().write_all(&input).unwrap();
        let rest: Vec<String> = out.lines().map(|l| l.unwrap()).collect();
        let status = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&status.stderr).into_owned();
        assert!(
            rest.last().is_some_and(|l| l.starts_with("result ")),
            "{:?}: {state}{rest:?}\n{err}",
            sh.argv
        );
        (state.trim_end().to_string(), rest, new)
    }

    fn run_clean(
        sh: &Shell,
        ws: &Path,
        ctx: &Path,
        base: Option<&Manifest>,
        verify: bool,
        compression: Compression,
    ) -> (String, Vec<String>, Manifest) {
        let (state, rest, m) = run_sync(sh, ws, ctx, base, verify, compression);
        assert_eq!(
            rest.last().map(String::as_str),
            Some("result clean"),
            "{state} {rest:?}"
        );
        (state, rest, m)
    }

    fn make_tree(ctx: &Path) {
        use std::os::unix::fs::{PermissionsExt, symlink};
        for (path, body) in [
            ("plain.txt", "hello\n"),
            ("with space/and ünïcödé.md", "x"),
            ("new\nline/file\nname", "nl"),
            ("back\\slash", "bs"),
            ("-dash", "d"),
            ("a/lib/same.rs", "a"),
            ("b/lib/same.rs", "b"),
            ("empty", ""),
        ] {
            let p = ctx.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, body).unwrap();
        }
        std::fs::create_dir_all(ctx.join("empty dir")).unwrap();
        std::fs::set_permissions(
            ctx.join("plain.txt"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        std::fs::set_permissions(ctx.join("a"), std::fs::Permissions::from_mode(0o700)).unwrap();
        symlink("plain.txt", ctx.join("link")).unwrap();
        symlink("/etc/passwd", ctx.join("abs link")).unwrap();
    }

    fn edit_tree(ctx: &Path) {
        use std::os::unix::fs::{PermissionsExt, symlink};
        // file -> folder, folder -> file, retarget, chmod, delete, rename.
        std::fs::remove_file(ctx.join("empty")).unwrap();
        std::fs::create_dir_all(ctx.join("empty/inside")).unwrap();
        std::fs::write(ctx.join("empty/inside/f"), "now a folder").unwrap();
        std::fs::remove_dir_all(ctx.join("b")).unwrap();
        std::fs::write(ctx.join("b"), "now a file").unwrap();
        std::fs::remove_file(ctx.join("link")).unwrap();
        symlink("-dash", ctx.join("link")).unwrap();
        std::fs::set_permissions(
            ctx.join("plain.txt"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(ctx.join("a"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(ctx.join("with space"), ctx.join("renamed dir")).unwrap();
        std::fs::remove_file(ctx.join("new\nline/file\nname")).unwrap();
        std::fs::write(ctx.join("back\\slash"), "changed").unwrap();
    }

    /// The script applies a full send and then a delta with every kind of
    /// change, and its listing matches the prediction, in dash with GNU
    /// tools and in busybox sh with busybox's.
    #[test]
    fn applies_full_and_delta_in_gnu_and_busybox() {
        let dir = tempfile::tempdir().unwrap();
        let mut shells = vec![("gnu", gnu())];
        if let Some(bb) = busybox(dir.path()) {
            shells.push(("busybox", bb));
        }
        for (name, sh) in &shells {
            for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
                let case = dir.path().join(format!("{name}-{compression:?}"));
                let (ws, ctx) = (case.join("ws"), case.join("ctx"));
                std::fs::create_dir_all(&ctx).unwrap();
                make_tree(&ctx);
                let (state, _, m1) = run_clean(sh, &ws, &ctx, None, true, compression);
                assert_eq!(state, "state none - - - -");
                edit_tree(&ctx);
                let (state, _, m2) = run_clean(sh, &ws, &ctx, Some(&m1), true, compression);
                assert!(
                    state.starts_with(&format!("state clean {} ", m1.hash())),
                    "{state}"
                );
                let words: Vec<&str> = state.split(' ').collect();
                assert_eq!(words[3], words[4], "untouched copy: {state}");
                let (state, rest, _) = run_clean(sh, &ws, &ctx, Some(&m2), false, compression);
                assert!(
                    state.starts_with(&format!("state clean {}", m2.hash())),
                    "{state}"
                );
                assert_eq!(
                    rest,
                    [
                        format!("applied {}", m2.listing_hash()),
                        format!("tree {}", ws.join("contexts/k/tree").display()),
                        "result clean".into()
                    ]
                );
                let tree = ws.join("contexts/k/tree");
                assert_eq!(
                    std::fs::read(tree.join("empty/inside/f")).unwrap(),
                    b"now a folder"
                );
                assert_eq!(std::fs::read(tree.join("b")).unwrap(), b"now a file");
                assert_eq!(
                    std::fs::read_link(tree.join("link")).unwrap(),
                    Path::new("-dash")
                );
                assert!(!tree.join("with space").exists());
                assert!(tree.join("renamed dir/and ünïcödé.md").exists());
            }
        }
    }

    /// A change on the builder that keeps size and mtime escapes the
    /// listing but not `--verify`; one that touches the mtime is seen by
    /// the listing, and a delta for a copy in another state is refused.
    #[test]
    fn detects_tampering_and_refuses_stale_deltas() {
        let dir = tempfile::tempdir().unwrap();
        let sh = gnu();
        let (ws, ctx) = (dir.path().join("ws"), dir.path().join("ctx"));
        std::fs::create_dir_all(&ctx).unwrap();
        make_tree(&ctx);
        let (_, _, m1) = run_clean(&sh, &ws, &ctx, None, false, Compression::None);
        let victim = ws.join("contexts/k/tree/a/lib/same.rs");
        let mtime = std::fs::metadata(&victim).unwrap().modified().unwrap();
        std::fs::write(&victim, "X").unwrap();
        let f = std::fs::File::options().write(true).open(&victim).unwrap();
        f.set_modified(mtime).unwrap();
        drop(f);

        let (state, rest, _) = run_sync(&sh, &ws, &ctx, Some(&m1), false, Compression::None);
        assert!(state.starts_with("state clean"), "{state}");
        let words: Vec<&str> = state.split(' ').collect();
        assert_eq!(
            words[3], words[4],
            "same size and mtime: the listing cannot tell"
        );
        assert_eq!(rest.last().unwrap(), "result clean");

        let (_, rest, _) = run_sync(&sh, &ws, &ctx, Some(&m1), true, Compression::None);
        assert_eq!(rest.last().unwrap(), "result mismatch files", "{rest:?}");
        let (state, rest, _) = run_sync(&sh, &ws, &ctx, Some(&m1), false, Compression::None);
        assert!(
            state.starts_with("state dirty"),
            "a failed check leaves it dirty: {state}"
        );
        assert_eq!(rest.last().unwrap(), "result stale");

        let (_, _, m1) = run_clean(&sh, &ws, &ctx, None, false, Compression::None);
        std::fs::write(&victim, "Y").unwrap();
        // (The listing has whole seconds: make sure this one is another.)
        std::fs::File::options()
            .write(true)
            .open(&victim)
            .unwrap()
            .set_modified(mtime + std::time::Duration::from_secs(100))
            .unwrap();
        let (state, rest, _) = run_sync(&sh, &ws, &ctx, Some(&m1), false, Compression::None);
        let words: Vec<&str> = state.split(' ').collect();
        assert_ne!(
            words[3], words[4],
            "a new mtime shows in the listing: {state}"
        );
        assert_eq!(rest.last().unwrap(), "result stale");
    }

    /// An edit of the copy that keeps the size and stays within the second
    /// of the file's mtime changes the fingerprint (stat's nanoseconds), in
    /// dash with GNU tools and in busybox sh with busybox's: timing cannot
    /// hide it.
    #[test]
    fn an_edit_within_the_same_second_changes_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let mut shells = vec![("gnu", gnu())];
        if let Some(bb) = busybox(dir.path()) {
            shells.push(("busybox", bb));
        }
        for (name, sh) in &shells {
            let case = dir.path().join(name);
            let (ws, ctx) = (case.join("ws"), case.join("ctx"));
            std::fs::create_dir_all(&ctx).unwrap();
            make_tree(&ctx);
            let second = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
            let f = std::fs::File::options()
                .write(true)
                .open(ctx.join("plain.txt"))
                .unwrap();
            f.set_modified(second + std::time::Duration::from_nanos(100))
                .unwrap();
            drop(f);
            let (_, _, m1) = run_clean(sh, &ws, &ctx, None, false, Compression::None);
            let victim = ws.join("contexts/k/tree/plain.txt");
            std::fs::write(&victim, "HELLO\n").unwrap();
            let f = std::fs::File::options().write(true).open(&victim).unwrap();
            f.set_modified(second + std::time::Duration::from_nanos(200))
                .unwrap();
            drop(f);
            let (state, rest, _) = run_sync(sh, &ws, &ctx, Some(&m1), false, Compression::None);
            let words: Vec<&str> = state.split(' ').collect();
            assert_eq!(words[1], "clean", "{name}: {state}");
            assert_ne!(words[3], words[4], "{name}: the edit must show: {state}");
            assert_eq!(rest.last().unwrap(), "result stale", "{name}");
        }
    }

    /// A copy marked clean in an earlier boot is reported as such (the
    /// client then hashes everything again: a crash may have lost data
    /// that the state file claims).
    #[test]
    fn a_reboot_since_the_last_sync_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let (ws, ctx) = (dir.path().join("ws"), dir.path().join("ctx"));
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("f"), "x").unwrap();
        let (_, _, m) = run_clean(&gnu(), &ws, &ctx, None, false, Compression::None);
        let (state, _, _) = run_clean(&gnu(), &ws, &ctx, Some(&m), false, Compression::None);
        assert!(state.ends_with(" same"), "{state}");
        let file = ws.join("contexts/k/state");
        let text = std::fs::read_to_string(&file).unwrap();
        let (head, _) = text.trim_end().rsplit_once(' ').unwrap();
        std::fs::write(&file, format!("{head} another-boot\n")).unwrap();
        let (state, _, _) = run_clean(&gnu(), &ws, &ctx, Some(&m), true, Compression::None);
        assert!(
            matches!(
                CopyState::parse(&state),
                Some(CopyState::Clean { rebooted: true, .. })
            ),
            "{state}"
        );
    }

    /// A relative workspace is relative to the login folder, and so is the
    /// run folder the copy is linked into (the lease creates it there).
    #[test]
    fn relative_workspace_and_run_folder() {
        let home = tempfile::tempdir().unwrap();
        let ctx = home.path().join("ctx");
        std::fs::create_dir_all(&ctx).unwrap();
        std::fs::write(ctx.join("f"), "x").unwrap();
        std::fs::create_dir_all(home.path().join("ws/runs/r1")).unwrap();
        let ws = Path::new("ws");
        let (_, rest, _) = run_sync_in(
            &gnu(),
            Some(home.path()),
            ws,
            "ws/runs/r1",
            &ctx,
            None,
            false,
            Compression::None,
        );
        assert_eq!(rest.last().unwrap(), "result clean");
        let link = home.path().join("ws/runs/r1/context");
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            home.path().join("ws/contexts/k/tree")
        );
        assert_eq!(std::fs::read(link.join("f")).unwrap(), b"x");
    }

    #[test]
    fn request_lines() {
        let req = Request {
            base: Some("B"),
            new_manifest: "N",
            tar: TarMode::Gzip,
            expected_listing: "L",
            delete: &["a b".into(), "c\nd".into()],
            chmod: &[(0o755, "x".into())],
            verify: None,
            stream: None,
        };
        assert_eq!(
            req.encode(),
            b"v1 delta B N gzip L 0 - - -\na b\xFFc\xFEd\xFF\n00755\xFFx\xFF\n\n\n\n"
        );
    }

    /// The sync script for copy `k` of `ws`, linking into `run`, fed
    /// `input` while its output is read.
    fn sync_with_input(sh: &Shell, ws: &Path, run: &Path, input: Vec<u8>) -> std::process::Output {
        let mut child = Command::new(&sh.argv[0])
            .args(&sh.argv[1..])
            .args(["-c", SYNC, "absconda-sync"])
            .arg(ws)
            .arg("k")
            .arg(run)
            .env_clear()
            .env("PATH", &sh.path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        out
    }

    /// A streamed cold send: a reader on the run folder's fifo (standing
    /// in for `docker build -`) gets exactly the context's own archive,
    /// with nothing of the store in it, while the copy is unpacked, its
    /// files linked into the store and the copy marked clean; in dash with
    /// GNU tools (zstd too, when present) and in busybox sh.
    #[test]
    fn a_streamed_send_feeds_the_fifo_the_copy_and_the_store() {
        use crate::sync::store;
        use std::os::unix::fs::MetadataExt;
        let home = tempfile::tempdir().unwrap();
        let ctx = home.path().join("ctx");
        make_tree(&ctx);
        std::fs::write(ctx.join("big.bin"), vec![7u8; 300_000]).unwrap();
        let mut shells: Vec<(Shell, Compression)> = vec![(gnu(), Compression::None)];
        if Command::new("zstd").arg("--version").output().is_ok() {
            shells.push((gnu(), Compression::Zstd));
        }
        shells.push((gnu(), Compression::Gzip));
        shells.extend(busybox(home.path()).map(|b| (b, Compression::None)));
        for (i, (sh, compression)) in shells.iter().enumerate() {
            let ws = home.path().join(format!("ws{i}"));
            let run = ws.join("runs/r1");
            std::fs::create_dir_all(&run).unwrap();
            let entries = walk(&ctx, &DockerIgnore::parse(""), &[]).unwrap();
            let scanned = scan(entries, Vec::new(), &[]).unwrap();
            let new = scanned.manifest.clone();
            let plan = Plan::full(&new);
            let wanted = store::wanted(&scanned, &plan);
            let needed = wanted.iter().map(|w| w.variant.clone()).collect();
            let new_hash = new.hash();
            let (entries, extra) = scanned.tar_inputs(&plan.send);
            let first_len = crate::context::archive_len(&entries, &extra).unwrap();
            let (then, links) = store::stream_links(&scanned, &wanted, &needed, &new_hash);
            assert!(!links.is_empty());
            let tar_mode = match compression {
                Compression::None => TarMode::Plain,
                Compression::Gzip => TarMode::Gzip,
                Compression::Zstd => TarMode::Zstd,
            };
            let listing = new.listing_hash();
            let mut input = Request {
                base: None,
                new_manifest: &new_hash,
                tar: tar_mode,
                expected_listing: &listing,
                delete: &[],
                chmod: &[],
                verify: None,
                stream: Some(first_len),
            }
            .encode();
            let mut body = Vec::new();
            crate::context::write_two_archives(
                &entries,
                &extra,
                first_len,
                &then,
                &links,
                Compression::None,
                &mut body,
                Default::default(),
            )
            .unwrap();
            crate::context::write_two_archives(
                &entries,
                &extra,
                first_len,
                &then,
                &links,
                *compression,
                &mut input,
                Default::default(),
            )
            .unwrap();
            // The build's side: the fifo, and a reader that keeps what it got.
            let fifo = run.join("context.tar");
            assert!(
                Command::new("mkfifo")
                    .arg(&fifo)
                    .status()
                    .unwrap()
                    .success()
            );
            let got = run.join("got.tar");
            let reader = Command::new("sh")
                .args(["-c", "cat < \"$1\" > \"$2\"", "reader"])
                .arg(&fifo)
                .arg(&got)
                .spawn()
                .unwrap();
            let out = sync_with_input(sh, &ws, &run, input);
            let said = String::from_utf8_lossy(&out.stdout);
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                said.ends_with("result clean\n"),
                "{:?} {compression:?}: {said}\n{err}",
                sh.argv
            );
            let mut reader = reader;
            assert!(reader.wait().unwrap().success());
            let fed = std::fs::read(&got).unwrap();
            assert_eq!(fed.len() as u64, first_len, "{:?} {compression:?}", sh.argv);
            assert_eq!(fed, body[..first_len as usize], "{:?}", sh.argv);
            let marker = std::fs::read_to_string(run.join("streamed")).unwrap();
            assert_eq!(marker, format!("clean {new_hash}\n"));
            let tree = ws.join("contexts/k/tree");
            assert_eq!(
                std::fs::read(tree.join("big.bin")).unwrap(),
                vec![7u8; 300_000]
            );
            assert_eq!(std::fs::read_link(run.join("context")).unwrap(), tree);
            // Every file of the copy is one of the store's, under its name.
            let blobs = std::fs::read_dir(ws.join("store/b"))
                .unwrap_or_else(|e| panic!("{:?} {compression:?}: {e}: {said}\n{err}", sh.argv))
                .count();
            assert_eq!(blobs, links.len(), "{:?}", sh.argv);
            let md = std::fs::metadata(tree.join("big.bin")).unwrap();
            assert_eq!(md.nlink(), 2, "{:?}", sh.argv);
            assert!(
                !std::fs::read_dir(&tree).unwrap().any(|e| e
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with(".absconda")),
                "{:?}",
                sh.argv
            );
        }
    }

    /// With no reader on the fifo (the build never came), the sync still
    /// fills the copy after its wait, and the fifo is opened at exit, so
    /// a reader that comes late sees the end instead of waiting forever.
    #[test]
    fn a_streamed_send_without_a_reader_still_fills_the_copy() {
        let home = tempfile::tempdir().unwrap();
        let ctx = home.path().join("ctx");
        make_tree(&ctx);
        let sh = gnu();
        let ws = home.path().join("ws");
        let run = ws.join("runs/r1");
        std::fs::create_dir_all(&run).unwrap();
        let entries = walk(&ctx, &DockerIgnore::parse(""), &[]).unwrap();
        let scanned = scan(entries, Vec::new(), &[]).unwrap();
        let new = scanned.manifest.clone();
        let plan = Plan::full(&new);
        let (entries, extra) = scanned.tar_inputs(&plan.send);
        let first_len = crate::context::archive_len(&entries, &extra).unwrap();
        let new_hash = new.hash();
        let listing = new.listing_hash();
        let mut input = Request {
            base: None,
            new_manifest: &new_hash,
            tar: TarMode::Plain,
            expected_listing: &listing,
            delete: &[],
            chmod: &[],
            verify: None,
            stream: Some(first_len),
        }
        .encode();
        crate::context::write_two_archives(
            &entries,
            &extra,
            first_len,
            &[],
            &[],
            Compression::None,
            &mut input,
            Default::default(),
        )
        .unwrap();
        // A fifo nobody reads: the sync must not wait on it forever. (The
        // script waits 30 s for a fifo that is not there; this one is, and
        // tee would block opening it, so a reader opens it, reads nothing
        // and goes away: tee must go on writing the copy.)
        let fifo = run.join("context.tar");
        assert!(
            Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let quitter = Command::new("sh")
            .args(["-c", "exec 3< \"$1\"; exec 3<&-", "quitter"])
            .arg(&fifo)
            .spawn()
            .unwrap();
        let out = sync_with_input(&sh, &ws, &run, input);
        let mut quitter = quitter;
        quitter.wait().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            said.ends_with("result clean\n"),
            "{said}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            std::fs::read(ws.join("contexts/k/tree/plain.txt")).unwrap(),
            b"hello\n"
        );
    }
}
