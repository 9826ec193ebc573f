#!/usr/bin/env bash
# Start a throwaway Dovecot IMAP server on 127.0.0.1 for the bounce tests (idempotent).
# Private config and Maildirs under $CLARA_DOVECOT_DIR (default /tmp/clara-mail-dovecot),
# one user with a password, INBOX seeded with tests/bounce_samples when it is empty.
# Prints the line the tests read:  CLARA_TEST_IMAP_URL=imap://USER:PASS@127.0.0.1:PORT
# (and CLARA_DOVECOT_STARTED=1 when this run started it rather than found it running).
# `start-dovecot.sh stop` stops it. Needs root (Dovecot drops to its own users) and
# Debian's dovecot-imapd.
set -euo pipefail
PORT=${CLARA_IMAP_PORT:-10143}
DIR=${CLARA_DOVECOT_DIR:-/tmp/clara-mail-dovecot}
USER_NAME=clara
PASSWORD=clara-test-pw
URL="imap://${USER_NAME}:${PASSWORD}@127.0.0.1:${PORT}"
CONF="$DIR/dovecot.conf"
DOVECOT=$(command -v dovecot || echo /usr/sbin/dovecot)
SAMPLES="$(cd "$(dirname "$0")/.." && pwd)/tests/bounce_samples"

if [ "${1:-start}" = stop ]; then
  [ -f "$CONF" ] && "$DOVECOT" -c "$CONF" stop 2>/dev/null || true
  exit 0
fi
[ -x "$DOVECOT" ] || { echo "dovecot is not installed (apt-get install -y dovecot-imapd)" >&2; exit 1; }

running() { [ -f "$DIR/run/master.pid" ] && kill -0 "$(cat "$DIR/run/master.pid")" 2>/dev/null; }
if running; then echo "CLARA_TEST_IMAP_URL=$URL"; exit 0; fi

mkdir -p "$DIR/run" "$DIR/home/$USER_NAME/Maildir"/{cur,new,tmp}
cat > "$CONF" <<CONF
protocols = imap
listen = 127.0.0.1
base_dir = $DIR/run
state_dir = $DIR/state
log_path = $DIR/dovecot.log
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
# Tests try a wrong password on purpose: answer at once, and no per-IP penalty that
# would slow every later login from 127.0.0.1 (anvil-auth-penalty off, as documented).
auth_failure_delay = 0
first_valid_uid = 1
mail_location = maildir:~/Maildir
mail_uid = mail
mail_gid = mail
passdb {
  driver = passwd-file
  args = scheme=PLAIN username_format=%u $DIR/users
}
userdb {
  driver = static
  args = uid=mail gid=mail home=$DIR/home/%u
}
service imap-login {
  inet_listener imap {
    address = 127.0.0.1
    port = $PORT
  }
  inet_listener imaps {
    port = 0
  }
}
service anvil {
  unix_listener anvil-auth-penalty {
    mode = 0
  }
}
service stats {
  unix_listener stats-reader {
    mode = 0666
  }
  unix_listener stats-writer {
    mode = 0666
  }
}
CONF
echo "${USER_NAME}:{PLAIN}${PASSWORD}" > "$DIR/users"
mkdir -p "$DIR/state"
# Seed INBOX once, so a person can try `clara-mail bounces import --imap` by hand.
if [ -d "$SAMPLES" ] && [ -z "$(find "$DIR/home/$USER_NAME/Maildir" -type f -path '*/new/*' -o -type f -path '*/cur/*' | head -n 1)" ]; then
  n=0
  for f in "$SAMPLES"/*; do
    n=$((n + 1)); cp "$f" "$DIR/home/$USER_NAME/Maildir/new/1643100000.$n.clara-seed"
  done
fi
chown -R mail:mail "$DIR/home"
"$DOVECOT" -c "$CONF" </dev/null >/dev/null 2>&1
for _ in $(seq 1 50); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then
    echo "CLARA_TEST_IMAP_URL=$URL"; echo "CLARA_DOVECOT_STARTED=1"; exit 0
  fi
  sleep 0.1
done
echo "dovecot did not start; see $DIR/dovecot.log" >&2
exit 1
