package agent

import (
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/stasis-k8s/stasis/criurun"
)

// Sockets a checkpoint cannot take along.
//
// The tree is restored into a new pod: same image, new network namespace, new IP. CRIU restores
// an inet socket by binding it again to the address it had (connections excepted: TCP ones come
// back closed, see criurun/network.go, connected UDP sockets get the new pod's address, see
// criurun.FixingSource). A socket bound to the old pod IP therefore cannot come back
// (measured with this check off): IPv4 fails the restore ("inet: Can't bind inet socket (id 8):
// Cannot assign requested address", a cold start), and IPv6 is worse, CRIU binds with IP_FREEBIND,
// so the restore succeeds and the socket listens on an address nobody can reach. Either way the eviction would have been allowed on a checkpoint
// that cannot serve, so the dump fails instead, naming the socket and the fix. Sockets bound to
// the wildcard address or to loopback are the same in every pod and restore as they were.

// inetSocket is one line of /proc/<pid>/net/{tcp,tcp6,udp,udp6}.
type inetSocket struct {
	proto  string // "tcp" or "udp"
	local  netip.AddrPort
	remote netip.AddrPort
	state  int // TCP state (1 established … 10 listen); 7 (close) for unconnected UDP
	inode  uint64
}

const tcpListen = 0x0a

// procNetFiles are the socket tables of a network namespace, as /proc/<pid>/net shows them.
var procNetFiles = []struct{ file, proto string }{{"tcp", "tcp"}, {"tcp6", "tcp"}, {"udp", "udp"}, {"udp6", "udp"}}

// parseProcNet parses one socket table (/proc/net/tcp format: sl local rem st … uid timeout inode).
func parseProcNet(proto string, data []byte) ([]inetSocket, error) {
	var out []inetSocket
	lines := strings.Split(string(data), "\n")
	for i, l := range lines {
		f := strings.Fields(l)
		if i == 0 || len(f) < 10 {
			continue // header, or the empty last line
		}
		local, err := parseHexAddr(f[1])
		if err != nil {
			return nil, fmt.Errorf("line %d: local address %q: %w", i+1, f[1], err)
		}
		remote, err := parseHexAddr(f[2])
		if err != nil {
			return nil, fmt.Errorf("line %d: remote address %q: %w", i+1, f[2], err)
		}
		st, err := strconv.ParseUint(f[3], 16, 8)
		if err != nil {
			return nil, fmt.Errorf("line %d: state %q: %w", i+1, f[3], err)
		}
		ino, err := strconv.ParseUint(f[9], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("line %d: inode %q: %w", i+1, f[9], err)
		}
		out = append(out, inetSocket{proto: proto, local: local, remote: remote, state: int(st), inode: ino})
	}
	return out, nil
}

// parseHexAddr parses "0100007F:1F90" (IPv4) or 32 hex digits ":port" (IPv6): the address is
// printed as 32-bit words in the kernel's (little-endian) byte order, the port in hex.
func parseHexAddr(s string) (netip.AddrPort, error) {
	a, p, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, errors.New("no port")
	}
	port, err := strconv.ParseUint(p, 16, 16)
	if err != nil {
		return netip.AddrPort{}, err
	}
	raw, err := hex.DecodeString(a)
	if err != nil || (len(raw) != 4 && len(raw) != 16) {
		return netip.AddrPort{}, fmt.Errorf("not an IPv4 or IPv6 address")
	}
	for w := 0; w < len(raw); w += 4 {
		binary.BigEndian.PutUint32(raw[w:], binary.LittleEndian.Uint32(raw[w:]))
	}
	addr, _ := netip.AddrFromSlice(raw)
	return netip.AddrPortFrom(addr, uint16(port)), nil
}

// podSpecific tells whether a socket is bound to an address that belongs to this pod (not the
// wildcard, not loopback), in a way CRIU restores by binding to it again. Connections are not:
// TCP ones are restored closed, connected UDP sockets get the new pod's address
// (criurun.FixingSource).
func (s inetSocket) podSpecific() bool {
	a := s.local.Addr().Unmap()
	if s.local.Port() == 0 || a.IsUnspecified() || a.IsLoopback() {
		return false
	}
	return s.remote.Port() == 0
}

func (s inetSocket) describe() string {
	what := "bound"
	switch {
	case s.proto == "tcp" && s.state == tcpListen:
		what = "listening"
	case s.remote.Port() != 0:
		what = "connected to " + s.remote.String()
	}
	return fmt.Sprintf("%s %s (%s)", strings.ToUpper(s.proto), s.local, what)
}

// socketInodes maps the inode of every socket the processes hold open to the first holder.
func socketInodes(pids []int) map[uint64]int {
	out := map[uint64]int{}
	for _, p := range pids {
		fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", p))
		for _, de := range fds {
			t, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", p, de.Name()))
			if err != nil || !strings.HasPrefix(t, "socket:[") {
				continue
			}
			if ino, err := strconv.ParseUint(strings.Trim(t[len("socket:"):], "[]"), 10, 64); err == nil {
				if _, seen := out[ino]; !seen {
					out[ino] = p
				}
			}
		}
	}
	return out
}

// ErrPodAddressSocket is the dump's refusal of a tree holding a socket bound to the pod's IP.
var ErrPodAddressSocket = errors.New("sockets bound to this pod's IP address cannot be restored in the replacement pod (it gets another IP)")

// checkSockets refuses a tree (root app, host PID) holding an inet socket bound to an address of
// the pod's network namespace (that of the container's PID 1, launcher). Sockets of network
// namespaces the tree made itself are not in the pod's tables: CRIU dumps such a namespace whole.
func checkSockets(app, launcher int) error {
	tree := criurun.Descendants(app)
	held := socketInodes(tree)
	if len(held) == 0 {
		return nil
	}
	var bad []string
	for _, f := range procNetFiles {
		path := fmt.Sprintf("/proc/%d/net/%s", launcher, f.file)
		data, err := os.ReadFile(path)
		if errors.Is(err, os.ErrNotExist) {
			continue // no IPv6 in this kernel
		}
		if err != nil {
			return fmt.Errorf("reading the pod's sockets: %w", err)
		}
		socks, err := parseProcNet(f.proto, data)
		if err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		for _, s := range socks {
			if pid, ok := held[s.inode]; ok && s.podSpecific() {
				shown := pid // the container's PID, what its user sees
				if p, err := pidIn(pid, launcher); err == nil {
					shown = p
				}
				bad = append(bad, fmt.Sprintf("%s in process %d (%s)", s.describe(), shown, comm(pid)))
			}
		}
	}
	if len(bad) == 0 {
		return nil
	}
	return fmt.Errorf("%w: %s; bind the wildcard address instead (0.0.0.0 or ::, or 127.0.0.1 / ::1 for pod-local use) so that the restored app serves at the new pod's IP",
		ErrPodAddressSocket, strings.Join(bad, "; "))
}

// comm is a process's command name, for messages.
func comm(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid))
	if err != nil {
		return "?"
	}
	return strings.TrimSpace(string(b))
}
