//go:build e2e

package e2e

// What the hostile suite reads on the host (the harness is root on the machine that runs both
// nodes): file trees before and after an attack, the agents' key, and a pod's filesystem as its
// processes see it (/proc/<pid>/root).

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/stasis-k8s/stasis/checkpoint"
	"github.com/stasis-k8s/stasis/tests/e2e/harness"
)

// treeState describes every entry below dir (mode, size, mtime, content hash, link target): two
// equal states mean nothing was created, removed, written or re-linked there.
func treeState(t *testing.T, dir string) map[string]string {
	t.Helper()
	st := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		info, err := d.Info()
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		desc := fmt.Sprintf("%v %d %d", info.Mode(), info.Size(), info.ModTime().UnixNano())
		switch {
		case info.Mode()&fs.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			desc += " -> " + target
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			desc += fmt.Sprintf(" %x", sha256.Sum256(b))
		}
		st[rel] = desc
		return nil
	})
	require.NoError(t, err, "state of %s", dir)
	return st
}

// dirNames lists a directory's entries.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	require.NoError(t, err)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	sort.Strings(names)
	return names
}

// plantMarker makes a host marker directory: a file holding token, and a subdirectory named like a
// checkpoint (what a prune that followed a symlink would remove), removed when the test ends.
func plantMarker(t *testing.T, dir, token string) {
	t.Helper()
	require.NoError(t, os.MkdirAll(filepath.Join(dir, "20260101T000000.000Z-000000"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "marker"), []byte(token+"\n"), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "20260101T000000.000Z-000000", checkpoint.ManifestName), []byte(token+"\n"), 0o644))
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
}

// scan is what scanTree read and found.
type scan struct {
	files int
	bytes int64
	found []string // "<file>: <needle #>"
}

// scanTree reads every regular file below root (not /proc, /sys, /dev of a container root, nor
// through symlinks) and reports the files holding any of needles.
func scanTree(t *testing.T, root string, needles [][]byte) scan {
	t.Helper()
	var s scan
	// The trailing slash makes WalkDir follow root itself when it is a link (/proc/<pid>/root).
	root = strings.TrimSuffix(root, "/") + "/"
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil // vanished while walking
		}
		rel, _ := filepath.Rel(root, p)
		if d.IsDir() && (rel == "proc" || rel == "sys" || rel == "dev") {
			return filepath.SkipDir
		}
		if !d.Type().IsRegular() {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return nil
		}
		s.files++
		s.bytes += int64(len(b))
		for i, n := range needles {
			if bytes.Contains(b, n) {
				s.found = append(s.found, fmt.Sprintf("%s: needle %d", rel, i))
			}
		}
		return nil
	})
	require.NoError(t, err)
	return s
}

// agentKeyNeedles reads the manifest key's source from a running agent (its key file, through
// /proc/<pid>/root) and returns the byte strings that would betray it: the derived key raw, hex
// and base64, the private key's secret scalar raw and hex, and the PEM's first line (the one
// holding the secret). Every agent must hold the same key.
func agentKeyNeedles(t *testing.T) [][]byte {
	t.Helper()
	ids := agentContainerIDs(t)
	var needles [][]byte
	agents := 0
	for _, pid := range hostPIDs(t) {
		argv := cmdline(pid)
		if len(argv) < 2 || filepath.Base(argv[0]) != "stasis" || argv[1] != "agent" || !inContainer(pid, ids) {
			continue // not an agent of this cluster (another local cluster may run on the machine)
		}
		vars := environ(pid)
		keyFile := vars["STASIS_MANIFEST_KEY_FILE"]
		if keyFile == "" {
			keyFile = vars["STASIS_TLS_KEY_FILE"]
		}
		require.NotEmpty(t, keyFile, "agent %d: no key file in its environment", pid)
		path := fmt.Sprintf("/proc/%d/root%s", pid, keyFile)
		key, err := checkpoint.KeyFromFile(path)
		require.NoError(t, err)
		pemBytes, err := os.ReadFile(path)
		require.NoError(t, err)
		these := [][]byte{key, []byte(hex.EncodeToString(key)), []byte(base64.StdEncoding.EncodeToString(key))}
		these = append(these, privateNeedles(t, pemBytes)...)
		if needles == nil {
			needles = these
		} else {
			require.Equal(t, needles, these, "every agent holds the same key")
		}
		agents++
	}
	require.Equal(t, len(env.Local.Nodes), agents, "one agent per node found on the host")
	return needles
}

// agentContainerIDs are the container IDs of this cluster's agents.
func agentContainerIDs(t *testing.T) []string {
	t.Helper()
	pods, err := env.Client.CoreV1().Pods(harness.StasisNamespace).List(context.Background(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=stasis-agent"})
	require.NoError(t, err)
	var ids []string
	for _, p := range pods.Items {
		for _, c := range p.Status.ContainerStatuses {
			if _, id, ok := strings.Cut(c.ContainerID, "://"); ok {
				ids = append(ids, id)
			}
		}
	}
	require.NotEmpty(t, ids, "no running agent container")
	return ids
}

// inContainer reports whether a host process lives in the cgroup of one of the containers.
func inContainer(pid int, ids []string) bool {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", pid))
	for _, id := range ids {
		if bytes.Contains(b, []byte(id)) {
			return true
		}
	}
	return false
}

func privateNeedles(t *testing.T, pemBytes []byte) [][]byte {
	t.Helper()
	blk, _ := pem.Decode(pemBytes)
	require.NotNil(t, blk, "the agent's key file is not PEM")
	var out [][]byte
	if lines := strings.Split(string(pemBytes), "\n"); len(lines) > 1 && len(lines[1]) >= 40 {
		out = append(out, []byte(lines[1]))
	}
	var k any
	var err error
	if k, err = x509.ParsePKCS8PrivateKey(blk.Bytes); err != nil {
		if k, err = x509.ParseECPrivateKey(blk.Bytes); err != nil {
			k, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
		}
	}
	require.NoError(t, err, "parse the agent's private key")
	var secret []byte
	switch k := k.(type) {
	case *ecdsa.PrivateKey:
		secret = k.D.FillBytes(make([]byte, (k.Curve.Params().BitSize+7)/8))
	case *rsa.PrivateKey:
		secret = k.D.Bytes()
	case ed25519.PrivateKey:
		secret = k.Seed()
	}
	require.NotEmpty(t, secret, "private key of type %T", k)
	return append(out, secret, []byte(hex.EncodeToString(secret)))
}

// scanPod scans the filesystem view of every host process whose command line contains fragment
// (a pod's launcher and app), once per mount namespace, for needles.
func scanPod(t *testing.T, fragment string, needles [][]byte, wantLoot bool) {
	t.Helper()
	seen := map[string]bool{}
	loot := false
	for _, pid := range hostPIDs(t) {
		if !strings.Contains(strings.Join(cmdline(pid), " "), fragment) {
			continue
		}
		mnt, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
		if err != nil || seen[mnt] {
			continue
		}
		seen[mnt] = true
		root := fmt.Sprintf("/proc/%d/root", pid)
		if info, err := os.Stat(root + "/tmp/hunt-loot"); err == nil && info.Size() > 0 {
			loot = true
		}
		s := scanTree(t, root, needles)
		require.Greater(t, s.files, 5, "the pod's view must have been read (%s)", root)
		t.Logf("pod view of pid %d (%s): %d files, %d bytes scanned", pid, mnt, s.files, s.bytes)
		assert.Empty(t, s.found, "the agents' key is readable in the pod (pid %d)", pid)
	}
	require.NotEmpty(t, seen, "no process with %q on the host", fragment)
	if wantLoot {
		assert.True(t, loot, "the hunt's loot must be among what was scanned")
	}
}

func hostPIDs(t *testing.T) []int {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	require.NoError(t, err)
	var pids []int
	for _, e := range ents {
		var pid int
		if _, err := fmt.Sscanf(e.Name(), "%d", &pid); err == nil && fmt.Sprint(pid) == e.Name() {
			pids = append(pids, pid)
		}
	}
	return pids
}

func cmdline(pid int) []string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || len(b) == 0 {
		return nil
	}
	return strings.Split(strings.TrimRight(string(b), "\x00"), "\x00")
}

func environ(pid int) map[string]string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
	env := map[string]string{}
	for _, kv := range strings.Split(string(b), "\x00") {
		if k, v, ok := strings.Cut(kv, "="); ok {
			env[k] = v
		}
	}
	return env
}
