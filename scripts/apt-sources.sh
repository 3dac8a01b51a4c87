# Reading apt's sources in both of their forms; sourced by setup-host.sh and by the
# unit tests (tests/unit/test_setup_sources.py), which point it at fixture folders.
#
# Debian's own container images have no /etc/apt/sources.list at all, only
# sources.list.d/debian.sources in deb822 form ("URIs:" lines); older installs have
# one-line "deb URI SUITE COMPONENTS" entries; many machines have both. apt reads only
# sources.list and sources.list.d/*.list and *.sources, so nothing else is looked at
# (a "foo.list.disabled" file is not a source).
#
# Every function takes the apt folder (normally /etc/apt) as its first parameter and
# never fails because a file is missing: `grep` on a missing file exits 2, which under
# `set -e -o pipefail` ended setup silently before.

# The files apt reads in folder $1, in apt's order, one per line: "list PATH" or
# "sources PATH" (sources.list first, then sources.list.d/ by file name).
apt_source_files() {
    local dir=$1 f
    if [ -f "$dir/sources.list" ]; then printf 'list %s\n' "$dir/sources.list"; fi
    for f in "$dir"/sources.list.d/*; do
        [ -f "$f" ] || continue
        case "$f" in
            *.list) printf 'list %s\n' "$f" ;;
            *.sources) printf 'sources %s\n' "$f" ;;
        esac
    done
    return 0
}

# Every enabled entry of type $2 ("deb" when not given, or "deb-src") in folder $1 as
# "URI SUITE" lines, one per URI and suite, in the order apt reads them. Options in
# brackets ("deb [arch=amd64] URI ...") are skipped; deb822 stanzas with "Enabled: no"
# are skipped; entries of the other type are skipped.
apt_entries() {
    local kind path type=${2:-deb}
    apt_source_files "$1" | while read -r kind path; do
        if [ "$kind" = list ]; then
            awk -v type="$type" '
                { sub(/#.*/, "") }
                $1 != type { next }
                { i = 2 }
                $i ~ /^\[/ { while (i <= NF && $i !~ /\]$/) i++; i++ }
                i + 1 <= NF { print $i, $(i + 1) }
            ' "$path"
        else
            awk -v type="$type" '
                function flush(   u, s, nu, ns, a, b, t, nt) {
                    nt = split(types, t, /[ \t]+/); is = 0
                    for (u = 1; u <= nt; u++) if (t[u] == type) is = 1
                    if (is && enabled !~ /^(no|false|0)$/) {
                        nu = split(uris, a, /[ \t]+/); ns = split(suites, b, /[ \t]+/)
                        for (u = 1; u <= nu; u++) for (s = 1; s <= ns; s++)
                            if (a[u] != "" && b[s] != "") print a[u], b[s]
                    }
                    types = ""; uris = ""; suites = ""; enabled = ""; last = ""
                }
                /^[ \t]*#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { if (last == "uris") uris = uris " " $0; else if (last == "suites") suites = suites " " $0; next }
                {
                    key = tolower($0); sub(/:.*/, "", key)
                    val = $0; sub(/^[^:]*:[ \t]*/, "", val); sub(/[ \t]+$/, "", val)
                    last = ""
                    if (key == "types") types = val
                    else if (key == "uris") { uris = val; last = "uris" }
                    else if (key == "suites") { suites = val; last = "suites" }
                    else if (key == "enabled") enabled = tolower(val)
                }
                END { flush() }
            ' "$path"
        fi
    done
}

# The Debian mirror that serves suite $2 (for example "bookworm") in folder $1: the
# first enabled entry for exactly that suite. Prints nothing when there is none.
debian_mirror() {
    # awk reads to the end (no early `exit`): a writer cut off by SIGPIPE would fail
    # the pipeline under `pipefail`.
    apt_entries "$1" | awk -v suite="$2" '$2 == suite && !found { sub(/\/+$/, "", $1); print $1; found = 1 }'
}

# Whether folder $1 already has an enabled entry for suite $2 (exit status).
apt_has_suite() {
    apt_entries "$1" | awk -v suite="$2" '$2 == suite { found = 1 } END { exit !found }'
}

# The mirror to fetch the source package of suite $2 from, for a machine whose own
# release is suite $3 (for example "unstable" on a "bookworm" machine), from folder $1:
# the first enabled deb-src entry for suite $2, else the first deb entry for suite $2,
# else the first deb entry for suite $3 (the same Debian mirror serves every suite).
# Prints nothing when there is none.
source_mirror() {
    local m
    m=$( { apt_entries "$1" deb-src | awk -v s="$2" '$2 == s'
           apt_entries "$1" | awk -v s="$2" '$2 == s'
           apt_entries "$1" | awk -v s="$3" '$2 == s'; } |
         awk '!found { sub(/\/+$/, "", $1); print $1; found = 1 }')
    [ -z "$m" ] || printf '%s\n' "$m"
}
