#!/usr/bin/env bash
# Installs the system programs the tests and the demo need (Debian/Ubuntu): OpenSSH server and
# client, rsync, zsh, iproute2. Does nothing when they are already present. Needs root or sudo to install.
set -euo pipefail
missing=()
[ -x /usr/sbin/sshd ] || missing+=(openssh-server)
command -v ssh >/dev/null 2>&1 || missing+=(openssh-client)
command -v ssh-keygen >/dev/null 2>&1 || missing+=(openssh-client)
command -v rsync >/dev/null 2>&1 || missing+=(rsync)
# zsh: the macOS adapter's quoting is checked against a real zsh.
command -v zsh >/dev/null 2>&1 || missing+=(zsh)
# ip (iproute2): ah-harness-containers puts followers in network namespaces.
command -v ip >/dev/null 2>&1 || missing+=(iproute2)
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages present: sshd, ssh, ssh-keygen, rsync, zsh, ip"
  exit 0
fi
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 || { echo "need root to install: ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
command -v apt-get >/dev/null 2>&1 || { echo "apt-get not found; install these yourself: ${missing[*]}" >&2; exit 1; }
echo "installing: ${missing[*]}"
"${sudo_cmd[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
