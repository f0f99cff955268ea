package agent

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"golang.org/x/sys/unix"

	"github.com/stasis-k8s/stasis/agentapi"
)

// testApps are test programs built on first use (agent/testdata/<name>), shared by the package.
var testApps sync.Map // name → func() (string, error)

// testApp builds ./testdata/<name> once and returns its path.
func testApp(t testing.TB, name string) string {
	t.Helper()
	build, _ := testApps.LoadOrStore(name, sync.OnceValues(func() (string, error) {
		bin := filepath.Join(filepath.Dir(stasisBin), name)
		cmd := exec.Command("go", "build", "-o", bin, "./testdata/"+name)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("go build ./testdata/%s: %v\n%s", name, err, out)
		}
		return bin, nil
	}))
	bin, err := build.(func() (string, error))()
	require.NoError(t, err)
	return bin
}

// podNet is a pod's network namespace as a CNI plugin leaves it: lo up, and eth0 holding the pod
// IP. eth0's peer stays in the namespace too, or, with a service namespace (the rest of the
// cluster), lives there as the pod's gateway. No address of these tests exists outside the
// namespaces they create.
type podNet struct {
	name, ip string
}

// newNetns is a network namespace with lo up.
func newNetns(t testing.TB) *podNet {
	t.Helper()
	n := &podNet{name: "stasis-t-" + randomHex(t, 6)}
	out, err := exec.Command("ip", "netns", "add", n.name).CombinedOutput()
	require.NoError(t, err, "ip netns add: %s", out)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.name).Run() })
	n.ipCmd(t, "link", "set", "lo", "up")
	return n
}

func (n *podNet) ipCmd(t testing.TB, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-n", n.name}, args...)...).CombinedOutput()
	require.NoError(t, err, "ip -n %s %v: %s", n.name, args, out)
}

// newServiceNet is the rest of the cluster: a namespace holding the service address svcIP.
func newServiceNet(t testing.TB) *podNet {
	n := newNetns(t)
	n.ip = svcIP
	n.ipCmd(t, "addr", "add", svcIP+"/32", "dev", "lo")
	return n
}

const svcIP = "10.96.0.10"

// newPodNet makes a pod's namespace with ip (a /24 whose .1 is the gateway in svc, if given).
func newPodNet(t testing.TB, ip string, svc ...*podNet) *podNet {
	t.Helper()
	n := newNetns(t)
	n.ip = ip
	if len(svc) == 0 {
		n.ipCmd(t, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
		n.ipCmd(t, "link", "set", "peer0", "up")
	} else {
		peer := "v" + randomHex(t, 4)
		n.ipCmd(t, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", svc[0].name)
		gw := ip[:strings.LastIndexByte(ip, '.')] + ".1"
		svc[0].ipCmd(t, "addr", "add", gw+"/24", "dev", peer)
		svc[0].ipCmd(t, "link", "set", peer, "up")
		defer n.ipCmd(t, "route", "add", "default", "via", gw)
	}
	n.ipCmd(t, "addr", "add", ip+"/24", "dev", "eth0")
	n.ipCmd(t, "link", "set", "eth0", "up")
	return n
}

func (n *podNet) path() string { return "/run/netns/" + n.name }

// container is the prefix that starts a container's PID 1 in this network namespace, before
// dropping privileges with base (as the runtime joins the pod's namespace).
func (n *podNet) container(base []string) []string {
	return append([]string{"nsenter", "--net=" + n.path(), "--"}, base...)
}

// inside runs f on a thread in the namespace: a socket is created in the namespace of the thread
// that creates it, and stays there.
func (n *podNet) inside(t testing.TB, f func() error) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the goroutine, namespace and all
		ns, err := os.Open(n.path())
		if err != nil {
			done <- err
			return
		}
		defer ns.Close()
		if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
			done <- err
			return
		}
		done <- f()
	}()
	require.NoError(t, <-done, "in %s", n.name)
}

// dial connects from the pod's network namespace but outside the container's tree (a sidecar, or
// another pod through the pod IP).
func (n *podNet) dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	var c net.Conn
	n.inside(t, func() (err error) { c, err = net.DialTimeout("tcp", addr, 10*time.Second); return err })
	t.Cleanup(func() { c.Close() })
	return c
}

// listenUDP binds a UDP socket in the namespace.
func (n *podNet) listenUDP(t testing.TB, addr string) net.PacketConn {
	t.Helper()
	var pc net.PacketConn
	n.inside(t, func() (err error) { pc, err = net.ListenPacket("udp", addr); return err })
	t.Cleanup(func() { pc.Close() })
	return pc
}

// datagram reads one datagram: its content and its sender.
func datagram(t testing.TB, pc net.PacketConn) (string, string) {
	t.Helper()
	buf := make([]byte, 512)
	_ = pc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, from, err := pc.ReadFrom(buf)
	require.NoError(t, err, "no datagram")
	return string(buf[:n]), from.String()
}

// ask sends one request to the netserver and returns its answer ("token=… served=N").
func ask(c net.Conn) (string, error) {
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.Write([]byte("get\n")); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	return strings.TrimSpace(line), err
}

// waitLog waits until the app's log holds a line matching re and returns the submatches.
func waitLog(t testing.TB, path string, re *regexp.Regexp) []string {
	t.Helper()
	var last string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(path)
		last = string(b)
		if m := re.FindStringSubmatch(last); m != nil {
			return m
		}
	}
	t.Fatalf("%s never matched %s; it holds:\n%s", path, re, last)
	return nil
}

// noMPTCP turns off Go's default of listening with Multipath TCP (Go >= 1.24), which CRIU cannot
// dump ("inet: Unsupported proto 262"): what a user of a Go server sets in the pod (see
// TestDumpRefusesUnrestorableSockets for what happens without it).
const noMPTCP = "GODEBUG=multipathtcp=0"

var readyRe = regexp.MustCompile(`ready token=([0-9a-f]+)`)

// A server holding a listening socket, an established connection from a client outside its tree
// and a connected UDP socket to a service elsewhere in the cluster: (a) dumped and thawed (the
// eviction was refused), the connection still works; (b) restored into a new pod (new network
// namespace, new IP), the app sees its old connection end as an ordinary EOF, a new client reaches
// the restored listening socket and gets the app's state, and its UDP reports reach the service
// from the new pod's IP, from the same port.
func TestTCPConnectionsThawAndRestore(t *testing.T) {
	server := testApp(t, "netserver")
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	r.serveLocal()
	logPath := filepath.Join(t.TempDir(), "events.log")
	args := []string{server, "-log", logPath, "-listen", ":7070", "-udpdial", svcIP + ":53"}
	svc := newServiceNet(t)
	reports := svc.listenUDP(t, svcIP+":53")
	pod1 := newPodNet(t, "10.213.1.2", svc)
	c := startContainerWith(t, "", pod1.container(restrictedContainer), append(r.env("app"), noMPTCP), append([]string{"--"}, args...)...)
	r.finder["app"] = c.launcherPID()
	token := waitLog(t, logPath, readyRe)[1]

	conn := pod1.dial(t, pod1.ip+":7070")
	got, err := ask(conn)
	require.NoError(t, err)
	require.Equal(t, "token="+token+" served=1", got)
	report, from := datagram(t, reports)
	require.Equal(t, got, report)
	require.True(t, strings.HasPrefix(from, pod1.ip+":"), "reported from the pod IP: %s", from)
	_, udpPort, _ := strings.Cut(from, ":")

	// (a) Dumped, then thawed: the connection was never locked or put in repair mode.
	spec := agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")}
	st := r.checkpoint("uid-tcp-1", spec)
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	require.True(t, r.agent.Delete("uid-tcp-1"), "thaw")
	got, err = ask(conn)
	require.NoError(t, err, "the established connection works after the thaw")
	assert.Equal(t, "token="+token+" served=2", got)
	report, _ = datagram(t, reports)
	assert.Equal(t, got, report)

	// (b) Dumped for good, the pod deleted, restored into a new pod with another IP.
	st = r.checkpoint("uid-tcp-2", spec)
	require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
	id := st.Containers[0].CheckpointID
	assert.Equal(t, 143, c.stop())
	_, err = ask(conn)
	assert.Error(t, err, "the old pod is gone: its client sees the connection end")

	pod2 := newPodNet(t, "10.213.2.2", svc)
	r.setpriv = pod2.container(restrictedContainer)
	c2 := r.restoreContainer("app", id, args...)
	c2.waitOutput("restored; supervising the restored tree")
	closed := regexp.MustCompile(`closed ` + regexp.QuoteMeta(conn.LocalAddr().String()) + `: (.*)`)
	assert.Equal(t, "read: EOF", waitLog(t, logPath, closed)[1], "the restored app sees its old connection end as an ordinary EOF")

	conn2 := pod2.dial(t, pod2.ip+":7070")
	got, err = ask(conn2)
	require.NoError(t, err, "a new client reaches the restored listening socket at the new pod IP")
	assert.Equal(t, "token="+token+" served=3", got, "the restored server answers with the state it had")
	report, from = datagram(t, reports)
	assert.Equal(t, got, report, "the restored UDP socket reports to the service")
	assert.Equal(t, pod2.ip+":"+udpPort, from, "from the new pod's IP, same port")
	b, _ := os.ReadFile(logPath)
	assert.Equal(t, 1, strings.Count(string(b), "ready"), "restored, not cold-started:\n%s", b)
	assert.NotContains(t, string(b), "udp report:")
	assert.Equal(t, 128+15, c2.stop())
}

// A socket bound to the pod's own IP cannot be restored in the replacement pod (another IP): the
// dump fails, naming the socket and the fix, and the app runs on. Wildcard and loopback binds
// dump. Go's default Multipath TCP listener is refused by CRIU itself, with its hint.
func TestDumpRefusesUnrestorableSockets(t *testing.T) {
	server := testApp(t, "netserver")
	r := newRig(t, Config{FreezeTimeout: time.Hour})
	tests := []struct {
		name  string
		args  []string
		env   string
		dial  string   // an address the app serves, asked after the dump
		fails []string // in the refusal, in order; none: the dump succeeds
	}{
		{"wildcard and loopback", []string{"-listen", ":7070", "-listen", "127.0.0.1:7071", "-listen", "[::1]:7072", "-udp", "0.0.0.0:5353", "-udp", "127.0.0.1:5354"},
			noMPTCP, "127.0.0.1:7071", nil},
		{"listening on the pod IPv4", []string{"-listen", "10.213.3.2:7070", "-listen", "127.0.0.1:7071"},
			noMPTCP, "10.213.3.2:7070", []string{"TCP 10.213.3.2:7070 (listening) in process", "(netserver)", "bind the wildcard address instead (0.0.0.0 or ::"}},
		{"listening on the pod IPv6 (CRIU would restore it with IP_FREEBIND, unreachable)", []string{"-listen", "[fd00:213::2]:7070"},
			noMPTCP, "[fd00:213::2]:7070", []string{"TCP [fd00:213::2]:7070 (listening)"}},
		{"UDP bound to the pod IP", []string{"-listen", "127.0.0.1:7071", "-udp", "10.213.3.2:5353"},
			noMPTCP, "127.0.0.1:7071", []string{"UDP 10.213.3.2:5353 (bound)"}},
		{"Go's default listener: Multipath TCP", []string{"-listen", ":7070"},
			"", "127.0.0.1:7070", []string{"CRIU log dump.log:", "Unsupported proto 262", "GODEBUG=multipathtcp=0"}},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pod := newPodNet(t, "10.213.3.2")
			out, err := exec.Command("ip", "-n", pod.name, "addr", "add", "fd00:213::2/64", "dev", "eth0", "nodad").CombinedOutput()
			require.NoError(t, err, "%s", out)
			logPath := filepath.Join(t.TempDir(), "events.log")
			env := r.env("app")
			if tt.env != "" {
				env = append(env, tt.env)
			}
			c := startContainerWith(t, "", pod.container(restrictedContainer), env, append([]string{"--", server, "-log", logPath}, tt.args...)...)
			r.finder["app"] = c.launcherPID()
			token := waitLog(t, logPath, readyRe)[1]

			uid := fmt.Sprintf("uid-sock-%d", i)
			st := r.checkpoint(uid, agentapi.ContainerSpec{Name: "app", Dir: r.dir("app")})
			if len(tt.fails) == 0 {
				require.Equal(t, agentapi.PhaseSucceeded, st.Phase, st.Message)
				require.True(t, r.agent.Delete(uid), "thaw")
			} else {
				require.Equal(t, agentapi.PhaseFailed, st.Phase, "an unrestorable socket must fail the dump")
				last := -1
				for _, s := range tt.fails {
					i := strings.Index(st.Message, s)
					require.Greater(t, i, last, "%q after the previous parts in: %s", s, st.Message)
					last = i
				}
			}
			// Either way the app runs on and serves.
			conn := pod.dial(t, tt.dial)
			got, err := ask(conn)
			require.NoError(t, err)
			assert.Equal(t, "token="+token+" served=1", got)
			assert.Equal(t, 128+15, c.stop())
		})
	}
}

// The socket tables of /proc/<pid>/net, as the kernel prints them.
func TestParseProcNet(t *testing.T) {
	tcp := `  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1234 1 0000000000000000 100 0 0 10 0
   1: 0201D50A:1F90 0201D50A:D2F4 01 00000000:00000000 02:000AB2C4 00000000     0        0 5678 2 0000000000000000 20 4 30 10 -1
`
	socks, err := parseProcNet("tcp", []byte(tcp))
	require.NoError(t, err)
	require.Len(t, socks, 2)
	assert.Equal(t, "127.0.0.1:8080", socks[0].local.String())
	assert.Equal(t, tcpListen, socks[0].state)
	assert.Equal(t, uint64(1234), socks[0].inode)
	assert.False(t, socks[0].podSpecific(), "loopback")
	assert.Equal(t, "10.213.1.2:8080", socks[1].local.String())
	assert.Equal(t, "10.213.1.2:54004", socks[1].remote.String())
	assert.False(t, socks[1].podSpecific(), "a connection: restored closed, never rebound")

	tcp6 := `  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 11 1 0000000000000000 100 0 0 10 0
   1: 0000000000000000FFFF00000201D50A:1F91 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12 1 0000000000000000 100 0 0 10 0
   2: 130200FD000000000000000002000000:1F92 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 13 1 0000000000000000 100 0 0 10 0
   3: 00000000000000000000000001000000:1F93 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 14 1 0000000000000000 100 0 0 10 0
`
	socks, err = parseProcNet("tcp", []byte(tcp6))
	require.NoError(t, err)
	require.Len(t, socks, 4)
	want := []struct {
		addr string
		pod  bool
	}{{"[::]:8080", false}, {"[::ffff:10.213.1.2]:8081", true}, {"[fd00:213::2]:8082", true}, {"[::1]:8083", false}}
	for i, w := range want {
		assert.Equal(t, w.addr, socks[i].local.String())
		assert.Equal(t, w.pod, socks[i].podSpecific(), w.addr)
	}

	udp := `   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  100: 0201D50A:14E9 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 99 2 0000000000000000 0
  101: 00000000:14EA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 98 2 0000000000000000 0
  102: 0201D50A:9C40 0A00600A:0035 01 00000000:00000000 00:00000000 00000000     0        0 97 2 0000000000000000 0
`
	socks, err = parseProcNet("udp", []byte(udp))
	require.NoError(t, err)
	require.Len(t, socks, 3)
	assert.True(t, socks[0].podSpecific(), "UDP bound to the pod IP")
	assert.Equal(t, "UDP 10.213.1.2:5353 (bound)", socks[0].describe())
	assert.False(t, socks[1].podSpecific(), "UDP on the wildcard")
	assert.Equal(t, "UDP 10.213.1.2:40000 (connected to 10.96.0.10:53)", socks[2].describe())
	assert.False(t, socks[2].podSpecific(), "connected UDP: the restore gives it the new pod's address")

	_, err = parseProcNet("tcp", []byte("header\n 0: 0100007F 00000000:0000 0A 0 0 0 0 0 1 1\n"))
	assert.ErrorContains(t, err, "line 2: local address")
}
