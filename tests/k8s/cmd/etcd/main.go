// Command etcd is upstream etcd's server entry point. Debian's etcd-server is
// 3.4, older than current kube-apiservers support, so the harness builds the
// etcd release that the pinned k8s.io/kubernetes itself depends on.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
