package criurun

import (
	"github.com/checkpoint-restore/go-criu/v7/rpc"
	"google.golang.org/protobuf/proto"
)

// Network options of every dump and restore.
//
// The tree is always restored into a new pod, with a new IP and a new network namespace: an
// established TCP connection cannot follow it (its peer talks to the old address). So:
//
//   - Dump with --tcp-close. Measured with CRIU 4.2.1, a server with one established connection,
//     dumped (left stopped) then thawed as after a refused eviction:
//     no option: the dump fails ("Connected TCP socket, consider using --tcp-established");
//     --tcp-established --network-lock iptables (CRIU's default lock): the dump fails, CRIU runs
//     `sh -c iptables …` to lock each connection ("execvp("sh", ...) failed", "Failed to lock TCP
//     connection"), and it must not run anything in the container anyway;
//     --tcp-established --network-lock nftables (libnftables, no binary): dumps, but after the
//     thaw the client's next request times out: CRIU leaves its lock (and the connection in TCP
//     repair mode) in place when the tree stays stopped, it only undoes them when the dump fails
//     or the tree is left running;
//     --tcp-established --network-lock skip: dumps, the thawed connection is reset;
//     --tcp-close: CRIU touches no connection at dump (neither repair mode nor lock), a thawed
//     app carries on with every connection intact (TestTCPConnectionsThawAndRestore).
//   - Restore with --tcp-close (CRIU insists: the images say so): each connection comes back as a
//     socket shut down both ways, which the app sees as the end of the connection (read returns
//     EOF, write fails with EPIPE), the way it sees a peer that went away. Listening sockets are
//     restored listening.
//   - --network-lock skip. With --tcp-close nothing is locked per connection, and the network
//     namespace is the pod's (not dumped, so not locked as a whole). nftables would still create
//     an empty table CRIU-<pid> in the pod's namespace at every dump and leave it there while the
//     tree stays stopped; iptables needs a binary from the container.
//
// The user's checkpoint-advanced-options are applied after these (CRIU reads its configuration
// file last): --tcp-established there changes nothing (CRIU checks --tcp-close first).
func networkOptions(o *rpc.CriuOpts) {
	o.TcpClose = proto.Bool(true)
	o.NetworkLock = rpc.CriuNetworkLockMethod_SKIP.Enum()
}
